//! A CA and a certificate it signed for 127.0.0.1, made with openssl (Debian's `openssl`
//! package), for the tests that speak TLS on loopback (`tests/redis.rs`, `tests/gateway.rs`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The files of a test CA and its leaf certificate for `127.0.0.1`, valid for a day.
pub struct TestCa {
    /// The folder that holds them (remove it when done).
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// Made in a new folder named after `name` and this process.
    pub fn make(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(format!("tkf-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |f: &str| dir.join(f).display().to_string();
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let steps: [Vec<String>; 3] = [
            vec![
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=tkf test CA",
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.pem"),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            vec![
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &p("key.pem"),
                "-out",
                &p("leaf.csr"),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            vec![
                "x509",
                "-req",
                "-days",
                "1",
                "-CAcreateserial",
                "-in",
                &p("leaf.csr"),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-extfile",
                &p("leaf.ext"),
                "-out",
                &p("cert.pem"),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        ];
        for args in steps {
            let made = Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl makes the test certificates: apt-get install -y openssl");
            assert!(
                made.status.success(),
                "{}",
                String::from_utf8_lossy(&made.stderr)
            );
        }
        TestCa {
            ca: dir.join("ca.pem"),
            dir: dir.clone(),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}
