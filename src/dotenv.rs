//! Keys from the environment and a `.env` file: a small parser, and the merge in which
//! variables already set in the environment win.
//!
//! The process environment is only read, never written (`std::env::set_var` races with
//! every other thread that reads the environment).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::ConfigError;
use crate::keys::{env_vars, numbered, KeySet};

/// Keys could not be read from the environment and a `.env` file.
///
/// The message names the file and line, or the variable, and what to do; it never contains a
/// value from the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum DotenvError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line of the file is not `KEY=value`.
    Syntax {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The keys found are not usable: none is set, one is empty, one is a duplicate, ….
    Keys {
        /// What is wrong, naming the variable.
        error: ConfigError,
        /// The file and line the variable was set on, when it came from the file.
        origin: Option<(PathBuf, usize)>,
    },
}

impl DotenvError {
    /// The key set error, when the file was read but the keys are not usable.
    pub fn config_error(&self) -> Option<&ConfigError> {
        match self {
            DotenvError::Keys { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for DotenvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DotenvError::Read { path, source } => {
                write!(f, "could not read {}: {source}", path.display())
            }
            DotenvError::Syntax {
                path,
                line,
                problem,
            } => write!(f, "{} line {line}: {problem}", path.display()),
            DotenvError::Keys { error, origin } => {
                write!(f, "{error}")?;
                if let Some((path, line)) = origin {
                    write!(f, " (set in {} line {line})", path.display())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for DotenvError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DotenvError::Read { source, .. } => Some(source),
            DotenvError::Keys { error, .. } => Some(error),
            DotenvError::Syntax { .. } => None,
        }
    }
}

impl From<ConfigError> for DotenvError {
    fn from(error: ConfigError) -> Self {
        DotenvError::Keys {
            error,
            origin: None,
        }
    }
}

/// Feature `dotenv`: keys from the environment and a `.env` file.
#[cfg_attr(docsrs, doc(cfg(feature = "dotenv")))]
impl KeySet {
    /// Like [`KeySet::from_env`], with the variables of `./.env` (in the current directory)
    /// added when the file exists. A variable already set in the environment wins over the
    /// file's, one by one; the environment is never changed.
    ///
    /// The file is read by [`dotenvy`](https://docs.rs/dotenvy) (its format: `KEY=value`
    /// lines, `export KEY=value`, blank lines and `#` comments; a value unquoted with no
    /// space or quote in it, `'single-quoted'` (taken literally) or `"double-quoted"` (with
    /// `\n`, `\\`, `\"`, `\'` and `\$` escapes); quoted values may span lines). `$VAR` is not
    /// expanded, and white space at the end of a line is dropped. When a name is given
    /// twice, the last line wins.
    ///
    /// Errors name the file and line or the variable, never a value.
    ///
    /// ```no_run
    /// use tower_key_fallback::KeySet;
    ///
    /// // .env:
    /// //   GROQ_API_KEY=gsk_...
    /// //   GROQ_API_KEY_2=gsk_...
    /// let keys = KeySet::from_env_and_dotenv("GROQ_API_KEY")?;
    /// # Ok::<(), tower_key_fallback::DotenvError>(())
    /// ```
    pub fn from_env_and_dotenv(prefix: &str) -> Result<KeySet, DotenvError> {
        let path = Path::new(".env");
        let file = match std::fs::read(path).map(zeroize::Zeroizing::new) {
            Ok(bytes) => Some(parse(path, &bytes)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(DotenvError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        merge(prefix, env_vars(prefix)?, file.as_ref())
    }

    /// Like [`KeySet::from_env_and_dotenv`], with the `.env` file at `path`, which must
    /// exist.
    ///
    /// ```
    /// use tower_key_fallback::KeySet;
    ///
    /// let path = std::env::temp_dir().join(format!("keys-doc-{}.env", std::process::id()));
    /// std::fs::write(&path, "# Groq\nexport TKF_DOC_KEY=gsk_a\nTKF_DOC_KEY_2='gsk_b' # spare\n")?;
    /// let keys = KeySet::from_env_and_dotenv_file("TKF_DOC_KEY", &path)?;
    /// assert_eq!(keys.labels().collect::<Vec<_>>(), ["TKF_DOC_KEY", "TKF_DOC_KEY_2"]);
    ///
    /// std::fs::write(&path, "TKF_DOC_KEY=gsk_a\nTKF_DOC_KEY_2=\"gsk_b\n")?;
    /// let err = KeySet::from_env_and_dotenv_file("TKF_DOC_KEY", &path).unwrap_err();
    /// assert!(err.to_string().ends_with("line 2: a double-quoted value has no closing quote"));
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_env_and_dotenv_file(
        prefix: &str,
        path: impl AsRef<Path>,
    ) -> Result<KeySet, DotenvError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| DotenvError::Read {
                path: path.to_owned(),
                source,
            })?;
        let file = parse(path, &bytes)?;
        merge(prefix, env_vars(prefix)?, Some(&file))
    }
}

/// The variables of a parsed `.env` file: name → (value, line), the last line winning.
#[derive(Debug, Default)]
pub(crate) struct DotenvFile {
    path: PathBuf,
    vars: HashMap<String, (String, usize)>,
}

#[cfg(fuzzing)]
impl DotenvFile {
    /// The variables, for the fuzz harness (`crate::__fuzz`).
    pub(crate) fn vars(&self) -> &HashMap<String, (String, usize)> {
        &self.vars
    }
}

/// The key set from `env` and the file's variables that `env` does not set.
pub(crate) fn merge(
    prefix: &str,
    env: Vec<(String, String)>,
    file: Option<&DotenvFile>,
) -> Result<KeySet, DotenvError> {
    let mut vars = env;
    let mut origins = HashMap::new();
    if let Some(file) = file {
        for (name, (value, line)) in &file.vars {
            if numbered(prefix, name).is_none() || vars.iter().any(|(n, _)| n == name) {
                continue;
            }
            origins.insert(name.clone(), (file.path.clone(), *line));
            vars.push((name.clone(), value.clone()));
        }
    }
    KeySet::from_vars(prefix, vars).map_err(|error| {
        let origin = match &error {
            ConfigError::Empty { name }
            | ConfigError::InvalidValue { name }
            | ConfigError::Quoted { name }
            | ConfigError::Duplicate { name, .. } => origins.get(name).cloned(),
            _ => None,
        };
        DotenvError::Keys { error, origin }
    })
}

/// Reads a `.env` file with `dotenvy`, whose errors quote the offending line (which may hold
/// a key): each is replaced by the file, the line and what is wrong, never the text.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<DotenvFile, DotenvError> {
    let syntax = |line: usize, problem: &'static str| DotenvError::Syntax {
        path: path.to_owned(),
        line,
        problem,
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            return Err(syntax(line, "not valid UTF-8"));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // White space at the end of a line is dropped (dotenvy refuses it after an unquoted
    // value, and an editor leaves it unseen).
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.trim_end_matches([' ', '\t', '\r']))
        .collect();
    let text = zeroize::Zeroizing::new(without_substitution(&lines.join("\n")));
    let mut file = DotenvFile {
        path: path.to_owned(),
        vars: HashMap::new(),
    };
    // The entries come in file order: the next one starts at the first line from `at` that
    // is neither blank nor a comment.
    let mut at = 0;
    for entry in dotenvy::from_read_iter(text.as_bytes()) {
        let start = (at..lines.len())
            .find(|&i| !matches!(lines[i].trim_start().chars().next(), None | Some('#')))
            .unwrap_or(lines.len().saturating_sub(1));
        match entry {
            Ok((name, value)) => {
                let line = (start..lines.len())
                    .find(|&i| defines(lines[i], &name))
                    .unwrap_or(start);
                // A quoted value may span lines: the next entry starts after its last.
                at = line + 1 + value.matches('\n').count();
                file.vars.insert(name, (value, line + 1));
            }
            Err(dotenvy::Error::LineParse(quoted, index)) => {
                let before: String = quoted.chars().take(index).collect();
                let (offset, problem) = describe(&lines[start..], before.matches('\n').count());
                // dotenvy says only where in its logical line: kept within the file.
                return Err(syntax((start + 1 + offset).min(lines.len()), problem));
            }
            Err(_) => return Err(syntax(start + 1, "could not be read")),
        }
    }
    Ok(file)
}

/// `text` with every `$` that dotenvy would expand escaped: values are taken as written.
/// Expansion is no use for keys, and `A=$A$A$A…` over a few lines grows a value
/// exponentially (the fuzz target found a 3 KB file that took a gigabyte).
fn without_substitution(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let (mut single, mut double, mut comment) = (false, false, false);
    let mut blank_before = true;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\n' => comment = false,
            _ if comment => {}
            '#' if !single && !double && blank_before => comment = true,
            '\\' if !single => {
                out.push(c);
                if let Some(next) = chars.next() {
                    out.push(next);
                }
                blank_before = false;
                continue;
            }
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '$' if !single => {
                out.push_str("\\$");
                blank_before = false;
                continue;
            }
            _ => {}
        }
        blank_before = c == ' ' || c == '\t' || c == '\n' || c == '=';
        out.push(c);
    }
    out
}

/// Whether `line` sets `name`: `NAME=`, `NAME =`, `export NAME=`.
fn defines(line: &str, name: &str) -> bool {
    let line = line.trim_start();
    let line = line.strip_prefix("export").map_or(line, str::trim_start);
    line.strip_prefix(name)
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// What is wrong with the entry that starts `lines` (dotenvy only says where): the line, from
/// the entry's first, and the problem. `hint` is dotenvy's own line offset.
fn describe(lines: &[&str], hint: usize) -> (usize, &'static str) {
    let first = lines[0].trim_start();
    let first = match first.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => first,
    };
    let Some((name, value)) = first.split_once('=') else {
        return (0, "expected KEY=value");
    };
    let name = name.trim_end();
    let mut chars = name.chars();
    let name_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !name_ok {
        return (
            0,
            "the name before `=` must be ASCII letters, digits, `_` or `.`, not starting with a digit",
        );
    }
    let value = value.trim_start();
    let quote = match value.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            return (
                hint,
                "an unquoted value may not hold spaces, quotes or `\\`: put it in quotes",
            )
        }
    };
    // Find the closing quote, over as many lines as it takes.
    let mut rest = &value[1..];
    for (offset, _) in lines.iter().enumerate() {
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' && quote == '"' {
                escaped = true;
            } else if c == quote {
                let tail = rest[i + 1..].trim_start();
                if !tail.is_empty() && !tail.starts_with('#') {
                    return (offset, "only a `#` comment may follow the closing quote");
                }
                return (hint, "an escape other than \\n, \\\\, \\\", \\' or \\$");
            }
        }
        match lines.get(offset + 1) {
            Some(next) => rest = next,
            None => break,
        }
    }
    match quote {
        '"' => (0, "a double-quoted value has no closing quote"),
        _ => (0, "a single-quoted value has no closing quote"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(String, String)> {
        let file = parse(Path::new(".env"), text.as_bytes()).unwrap();
        let mut vars: Vec<_> = file.vars.into_iter().map(|(k, (v, _))| (k, v)).collect();
        vars.sort();
        vars
    }

    fn var(text: &str) -> String {
        let all = vars(text);
        assert_eq!(all.len(), 1, "{all:?}");
        all.into_iter().next().unwrap().1
    }

    fn problem(text: &str) -> String {
        parse(Path::new("/app/.env"), text.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn values_unquoted_quoted_and_commented() {
        let cases = [
            ("K=v", "v"),
            ("K = v ", "v"),
            ("K=", ""),
            ("K=  ", ""),
            ("export K=v", "v"),
            ("export\tK=v", "v"),
            ("  K=v", "v"),
            ("K=v # comment", "v"),
            ("K=v\t# comment", "v"),
            ("K=a#b", "a#b"),
            ("K= # only a comment", ""),
            ("K='a b c'", "a b c"),
            ("K=\"it's\"", "it's"),
            ("K=a=b", "a=b"),
            ("K=v\r", "v"),
            ("K='single # not a comment'", "single # not a comment"),
            ("K='no \\n escapes'", "no \\n escapes"),
            ("K='v' # comment", "v"),
            ("K=\"double\"", "double"),
            ("K=\"a\\nb\"", "a\nb"),
            ("K=\"say \\\"hi\\\"\"", "say \"hi\""),
            ("K=\"back\\\\slash\"", "back\\slash"),
            ("K=\"\\$HOME stays\"", "$HOME stays"),
            ("K='$HOME'", "$HOME"),
            ("K=\"$HOME\"", "$HOME"),
            ("K=$HOME", "$HOME"),
            ("K=\"a${B}c\" # $C", "a${B}c"),
            // Found by the fuzz target: an escaped `$` is kept, and written back escaped.
            ("K=\"say L H E\\$MOq\"", "say L H E$MOq"),
            ("K=\"# not a comment\" # comment", "# not a comment"),
            ("K=\"\"", ""),
            ("K=''", ""),
            ("K.dotted_1=v", "v"),
            ("_K=v", "v"),
            ("\u{feff}K=bom", "bom"),
        ];
        for (text, want) in cases {
            assert_eq!(var(text), want, "{text:?}");
        }
    }

    /// Found by the fuzz target: with dotenvy's expansion, eight lines of `A="$A$A…"` grew
    /// a value to a gigabyte. Nothing is expanded: values are taken as written.
    #[test]
    fn variables_are_not_expanded_so_no_file_can_grow_a_value() {
        let line = format!("A=\"{}\"\n", "$A".repeat(300));
        let text = format!("A=x\n{}", line.repeat(8));
        let file = parse(Path::new(".env"), text.as_bytes()).unwrap();
        assert_eq!(file.vars["A"].0, "$A".repeat(300));
        assert_eq!(
            vars("A=x\nK=\"$A$A\" # it's $A\nL='$A'"),
            [
                ("A".into(), "x".into()),
                ("K".into(), "$A$A".into()),
                ("L".into(), "$A".into())
            ]
        );
    }

    #[test]
    fn a_whole_file_with_comments_blank_lines_and_multiline_values() {
        let text = "# Groq keys\r\n\
                    \r\n\
                    GROQ_API_KEY=gsk_a\r\n\
                    export GROQ_API_KEY_2='gsk_b' # spare\n\
                    \n\
                    \t# indented comment\n\
                    CERT=\"-----BEGIN-----\n\
                    line two\n\
                    -----END-----\"\n\
                    OTHER='multi\n\
                    line'\n\
                    GROQ_API_KEY_3=gsk_old\n\
                    GROQ_API_KEY_3=gsk_c";
        let file = parse(Path::new(".env"), text.as_bytes()).unwrap();
        let get = |k: &str| file.vars.get(k).cloned().unwrap();
        assert_eq!(get("GROQ_API_KEY"), ("gsk_a".into(), 3));
        assert_eq!(get("GROQ_API_KEY_2"), ("gsk_b".into(), 4));
        assert_eq!(
            get("CERT"),
            ("-----BEGIN-----\nline two\n-----END-----".into(), 7)
        );
        assert_eq!(get("OTHER"), ("multi\nline".into(), 10));
        // The last of two lines wins.
        assert_eq!(get("GROQ_API_KEY_3"), ("gsk_c".into(), 13));
        assert_eq!(file.vars.len(), 5);
    }

    #[test]
    fn syntax_errors_name_the_file_and_line_never_the_value() {
        let secret = "gsk_supersecret";
        let cases = [
            (
                format!("A=1\n{secret}\n"),
                "/app/.env line 2: expected KEY=value",
            ),
            (
                format!("A=1\n\nB=\"{secret}\n"),
                "/app/.env line 3: a double-quoted value has no closing quote",
            ),
            (
                format!("B='{secret}"),
                "/app/.env line 1: a single-quoted value has no closing quote",
            ),
            (
                format!("B=\"{secret}\" trailing"),
                "/app/.env line 1: only a `#` comment may follow the closing quote",
            ),
            (
                format!("B=\"x\n{secret}\" trailing"),
                "/app/.env line 2: only a `#` comment may follow the closing quote",
            ),
            (
                format!("1B={secret}"),
                "/app/.env line 1: the name before `=`",
            ),
            (
                format!("MY KEY={secret}"),
                "/app/.env line 1: the name before `=`",
            ),
            (
                format!("=({secret})"),
                "/app/.env line 1: the name before `=`",
            ),
            (
                format!("exportB={secret}\nexport"),
                "/app/.env line 2: expected KEY=value",
            ),
            // dotenvy's format: an unquoted value holds no space or quote, and a
            // double-quoted one knows the escapes \n, \\, \", \' and \$ only.
            (
                format!("A=1\nB={secret} x"),
                "/app/.env line 2: an unquoted value may not hold spaces",
            ),
            (
                format!("B={secret}'s"),
                "/app/.env line 1: an unquoted value may not hold spaces, quotes",
            ),
            (
                format!("B=\"{secret}\\t\""),
                "/app/.env line 1: an escape other than",
            ),
        ];
        for (text, want) in cases {
            let msg = problem(&text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
            assert!(!msg.contains(secret), "{msg}");
        }
        let mut bytes = b"A=1\nB=2\nC=\xff\n".to_vec();
        let err = parse(Path::new("x.env"), &bytes).unwrap_err().to_string();
        assert_eq!(err, "x.env line 3: not valid UTF-8");
        bytes.truncate(8);
        assert!(parse(Path::new("x.env"), &bytes).is_ok());
    }

    /// Generated files never make the parser panic; it reads a file the same way twice;
    /// what it reads, written back double-quoted, reads the same; and no error, of the parser
    /// or of the key set built from the file, shows a value.
    #[test]
    fn generated_files_parse_totally_and_errors_never_show_a_value() {
        // A `-` cannot be part of a name, so only a value can hold this.
        const SECRET: &str = "gsk-s3cr3t";
        const PIECES: &[&str] = &[
            "GROQ_API_KEY",
            "_2",
            "_3",
            "OTHER",
            "=",
            " = ",
            "export ",
            "export",
            "#",
            " # c",
            "'",
            "\"",
            "\\",
            "\\n",
            "\\\"",
            " ",
            "\t",
            "\n",
            "\n",
            "\r\n",
            "\r",
            SECRET,
            SECRET,
            "x",
            "1",
            "é",
            "\u{feff}",
            "$HOME",
        ];
        const NAMES: &[&str] = &[
            "GROQ_API_KEY",
            "GROQ_API_KEY_2",
            "GROQ_API_KEY_3",
            "OTHER",
            "1BAD",
            "A B",
            "",
        ];
        fn piece(next: &mut impl FnMut() -> u64, text: &mut Vec<u8>) {
            let r = next();
            if r.is_multiple_of(64) {
                // Now and then any byte, invalid UTF-8 too.
                text.push((r >> 8) as u8);
            } else {
                text.extend_from_slice(PIECES[(r >> 8) as usize % PIECES.len()].as_bytes());
            }
        }
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let path = Path::new("/app/.env");
        let leaks = |e: &DotenvError| format!("{e} {e:?}").contains("s3cr3t");
        let (mut read, mut syntax, mut keys, mut multi_line) = (0, 0, 0, 0);
        for _ in 0..10_000 {
            let mut text = Vec::new();
            for _ in 0..next() % 6 {
                let r = next();
                if r % 4 == 0 {
                    // Pieces in any order.
                    for _ in 0..next() % 8 {
                        piece(&mut next, &mut text);
                    }
                } else {
                    // An entry: a name, `=` and pieces, maybe quoted, maybe a comment.
                    if r & 0x100 != 0 {
                        text.extend_from_slice(b"export ");
                    }
                    text.extend_from_slice(NAMES[(r >> 16) as usize % NAMES.len()].as_bytes());
                    text.extend_from_slice([&b"="[..], b" = ", b"=\t"][(r >> 24) as usize % 3]);
                    let quote = [&b""[..], b"'", b"\""][(r >> 32) as usize % 3];
                    text.extend_from_slice(quote);
                    for _ in 0..next() % 6 {
                        piece(&mut next, &mut text);
                    }
                    text.extend_from_slice(quote);
                    if r & 0x200 != 0 {
                        text.extend_from_slice(b" # spare");
                    }
                }
                text.extend_from_slice([&b"\n"[..], b"\r\n", b""][(r >> 40) as usize % 3]);
            }
            let shown = String::from_utf8_lossy(&text);
            let lines = 1 + text.iter().filter(|&&b| b == b'\n').count();
            let file = match parse(path, &text) {
                Ok(file) => file,
                Err(e) => {
                    syntax += 1;
                    let DotenvError::Syntax { line, .. } = e else {
                        panic!("{e:?}")
                    };
                    assert!((1..=lines).contains(&line), "{shown:?}: {e}");
                    assert!(!leaks(&e), "{shown:?}: {e}");
                    continue;
                }
            };
            read += 1;
            assert_eq!(file.vars, parse(path, &text).unwrap().vars, "{shown:?}");
            for (name, (value, line)) in &file.vars {
                let mut chars = name.chars();
                assert!(
                    chars
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
                    "{shown:?}: {name:?}"
                );
                assert!((1..=lines).contains(line), "{shown:?}: {name} at {line}");
                let mut quoted = format!("{name}=\"");
                for c in value.chars() {
                    match c {
                        '"' | '\\' | '$' => quoted.extend(['\\', c]),
                        '\n' => quoted.push_str("\\n"),
                        c => quoted.push(c),
                    }
                }
                quoted.push('"');
                multi_line += usize::from(value.contains('\n'));
                let back = parse(path, quoted.as_bytes()).unwrap();
                assert_eq!(back.vars[name].0, *value, "{shown:?}: {quoted:?}");
            }
            if let Err(e) = merge("GROQ_API_KEY", Vec::new(), Some(&file)) {
                keys += 1;
                assert!(!leaks(&e), "{shown:?}: {e}");
            }
        }
        // The generator reaches files that parse, syntax errors, unusable keys and values
        // over several lines.
        assert!(
            read > 1_000 && syntax > 1_000 && keys > 1_000 && multi_line > 50,
            "{read} {syntax} {keys} {multi_line}"
        );
    }

    fn file(text: &str) -> DotenvFile {
        parse(Path::new("/app/.env"), text.as_bytes()).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn secrets(set: &KeySet) -> Vec<(String, String)> {
        set.clone()
            .into_keys()
            .iter()
            .map(|k| (k.label().to_owned(), k.secret().to_owned()))
            .collect()
    }

    #[test]
    fn the_environment_wins_variable_by_variable() {
        let f =
            file("GROQ_API_KEY=file_a\nGROQ_API_KEY_2=file_b\nGROQ_API_KEY_5=file_e\nHOME=/nope\n");
        let set = merge(
            "GROQ_API_KEY",
            env(&[("GROQ_API_KEY_2", "env_b"), ("GROQ_API_KEY_3", "env_c")]),
            Some(&f),
        )
        .unwrap();
        let want = [
            ("GROQ_API_KEY", "file_a"),
            ("GROQ_API_KEY_2", "env_b"),
            ("GROQ_API_KEY_3", "env_c"),
            ("GROQ_API_KEY_5", "file_e"),
        ];
        assert_eq!(secrets(&set), env(&want));
        // A variable set in the environment wins even when it is empty.
        let err = merge("GROQ_API_KEY", env(&[("GROQ_API_KEY", "")]), Some(&f)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "GROQ_API_KEY is set but empty: give it a value or remove it"
        );
        // No file: the environment alone.
        let set = merge("GROQ_API_KEY", env(&[("GROQ_API_KEY", "env_a")]), None).unwrap();
        assert_eq!(secrets(&set), env(&[("GROQ_API_KEY", "env_a")]));
    }

    #[test]
    fn key_errors_name_the_variable_and_where_the_file_set_it() {
        let secret = "gsk_supersecret";
        let f = file(&format!(
            "OTHER=x\nGROQ_API_KEY=\nGROQ_API_KEY_2='{secret} x'\nGROQ_API_KEY_3={secret}\n"
        ));
        let err = merge("GROQ_API_KEY", env(&[]), Some(&f)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "GROQ_API_KEY is set but empty: give it a value or remove it (set in /app/.env line 2)"
        );
        assert!(matches!(
            err.config_error(),
            Some(ConfigError::Empty { .. })
        ));
        let err = merge("GROQ_API_KEY", env(&[("GROQ_API_KEY", "ok")]), Some(&f)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("GROQ_API_KEY_2 holds characters"), "{msg}");
        assert!(msg.ends_with("(set in /app/.env line 3)"), "{msg}");
        assert!(!msg.contains(secret) && !format!("{err:?}").contains(secret));
        let err = merge(
            "GROQ_API_KEY",
            env(&[("GROQ_API_KEY", secret), ("GROQ_API_KEY_2", "b")]),
            Some(&f),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GROQ_API_KEY_3 is the same key as GROQ_API_KEY: remove the duplicate (set in /app/.env line 4)"
        );
        let err = merge("GROQ_API_KEY", env(&[]), Some(&file("OTHER=1\n"))).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("no API key found: set GROQ_API_KEY"));
    }

    #[test]
    fn files_on_disk_and_missing_files() {
        let dir = std::env::temp_dir().join(format!("tkf-dotenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.env");
        std::fs::write(
            &path,
            "TKF_TEST_ONLY_KEY=\"gsk_a\"\nTKF_TEST_ONLY_KEY_2=gsk_b\n",
        )
        .unwrap();
        let set = KeySet::from_env_and_dotenv_file("TKF_TEST_ONLY_KEY", &path).unwrap();
        assert_eq!(
            secrets(&set),
            env(&[
                ("TKF_TEST_ONLY_KEY", "gsk_a"),
                ("TKF_TEST_ONLY_KEY_2", "gsk_b")
            ])
        );
        let missing = dir.join("missing.env");
        let err = KeySet::from_env_and_dotenv_file("TKF_TEST_ONLY_KEY", &missing).unwrap_err();
        assert!(matches!(err, DotenvError::Read { .. }));
        assert!(err
            .to_string()
            .starts_with(&format!("could not read {}", missing.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
