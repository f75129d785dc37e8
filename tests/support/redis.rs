//! A real `redis-server` for the tests of feature `redis`: on 127.0.0.1 at a free port, no
//! persistence, stopped by its PID. A test that cannot start one fails and says how to install
//! it; it never passes without Redis.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run when `redis-server` is missing.
pub const INSTALL: &str = "apt-get install -y redis-server";

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

/// A port that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server on a free loopback port with more options (`--requirepass`, TLS).
    /// With `--tls-port`, pass `{port}` for the port: the plain port is then closed.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            if let Some(server) = RedisServer::try_start(free_port(), extra) {
                return server;
            }
        }
        panic!("redis-server did not start on a free loopback port (5 tries)");
    }

    /// Starts a server on `port` (a restart on the same address).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start(port, &[])
            .unwrap_or_else(|| panic!("redis-server did not start on 127.0.0.1:{port}"))
    }

    fn try_start(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let tls = extra.contains(&"--tls-port");
        let dir = std::env::temp_dir().join(format!("tkf-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = if tls {
            "0".to_owned()
        } else {
            port.to_string()
        };
        let extra: Vec<String> = extra
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &plain])
            .args(["--save", "", "--appendonly", "no"])
            .args(&extra)
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): these tests need a real Redis; install it with `{INSTALL}`")
            });
        let mut server = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.ping(tls) {
                return Some(server);
            }
            if let Some(child) = server.child.as_mut() {
                if child.try_wait().unwrap().is_some() {
                    server.child = None;
                    return None;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Whether the server answers: a `PING` answered (`+PONG`, or `-NOAUTH` with a password
    /// set), or, on a TLS port, a connection taken.
    fn ping(&self, tls: bool) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if tls {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    }

    /// Kills the server by its PID (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the server a signal by its PID (`STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// Runs one command through `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); install it with `{INSTALL}`"));
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A subscriber on this thread that keeps every line logged at `warn`.
#[derive(Clone, Default)]
pub struct Warnings(pub Arc<Mutex<Vec<u8>>>);

impl Warnings {
    /// The lines logged so far that hold `needle`.
    pub fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Makes this the subscriber of the thread, until the guard is dropped.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl Write for Warnings {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a replica's pool tells its observer, as `"kind key"` lines.
pub struct Watch(pub tokio::sync::mpsc::UnboundedSender<String>);

impl tower_key_fallback::KeyEvents for Watch {
    fn on_event(&self, event: &tower_key_fallback::KeyEvent<'_>) {
        use tower_key_fallback::KeyEvent;
        let line = match event {
            KeyEvent::CooledDown { key, .. } => format!("cooled {key}"),
            KeyEvent::BucketCooledDown { key, bucket, .. } => format!("bucket {key} {bucket}"),
            KeyEvent::Disabled { key, .. } => format!("disabled {key}"),
            KeyEvent::Reset { key, .. } => format!("reset {key}"),
            _ => return,
        };
        let _ = self.0.send(line);
    }
}
