//! Who may change the server's state: the admin token that `/admin/*` and the write routes
//! require, where it comes from, and how it is checked.

use std::path::{Path, PathBuf};

/// How write and admin routes are guarded.
#[derive(Clone)]
pub enum AdminAuth {
    /// `Authorization: Bearer <token>` is required.
    Token(AdminToken),
    /// Anyone who reaches the port may write and reload: chosen explicitly by the operator.
    Open,
}

impl std::fmt::Debug for AdminAuth {
    /// Says which guard is on, never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdminAuth::Token(_) => "AdminAuth::Token(<redacted>)",
            AdminAuth::Open => "AdminAuth::Open",
        })
    }
}

/// A secret of at least [`MIN_TOKEN_LEN`] bytes. It has no `Debug` or `Display`, so it cannot end
/// up in a log line by accident.
#[derive(Clone)]
pub struct AdminToken(String);

/// Tokens shorter than this are refused: a guessable token is no guard.
pub const MIN_TOKEN_LEN: usize = 16;

/// The file a token is written to when the operator gives none.
pub const TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the admin token is {0} bytes; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)")]
    TooShort(usize),
    #[error("cannot read the admin token from {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write a new admin token to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl AdminToken {
    pub fn new(token: &str) -> Result<AdminToken, AuthError> {
        let t = token.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TooShort(t.len()));
        }
        Ok(AdminToken(t.to_owned()))
    }

    /// The token in `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<AdminToken, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.to_owned(), source })?;
        AdminToken::new(&text)
    }

    /// The token in `path`, or a new random one written there (readable by the owner only)
    /// when the file does not exist yet, so a server started without a token is still guarded
    /// and its operator finds the token beside the run.
    pub fn load_or_create(path: &Path) -> Result<AdminToken, AuthError> {
        if path.exists() {
            return AdminToken::from_file(path);
        }
        let token = random_hex(32).map_err(|source| AuthError::Write { path: path.to_owned(), source })?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = needle_core::file::AtomicFile::create_private(path)?;
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            f.commit()
        };
        write().map_err(|source| AuthError::Write { path: path.to_owned(), source })?;
        AdminToken::new(&token)
    }

    /// Whether an `Authorization` header value carries this token. The comparison takes the
    /// same time wherever the first difference is, so response times do not reveal a prefix.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        constant_time_eq(given, self.0.as_bytes())
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(!y);
        diff |= x ^ y;
    }
    // Keeps the compiler from ending the loop early on a known difference.
    std::hint::black_box(diff) == 0
}

/// `bytes` random bytes from the kernel, as hex.
fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let t = AdminToken::new("0123456789abcdef-secret").unwrap();
        assert!(t.accepts(Some(b"Bearer 0123456789abcdef-secret")));
        for bad in [
            &b"Bearer 0123456789abcdef-secreT"[..],
            b"Bearer 0123456789abcdef-secret ",
            b"Bearer 0123456789abcdef-secre",
            b"Bearer ",
            b"Basic 0123456789abcdef-secret",
            b"0123456789abcdef-secret",
        ] {
            assert!(!t.accepts(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!t.accepts(None));
        assert!(matches!(AdminToken::new("short"), Err(AuthError::TooShort(5))));
    }

    #[test]
    fn a_missing_token_file_gets_a_new_private_token_that_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        let first = AdminToken::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(first.accepts(Some(format!("Bearer {}", text.trim()).as_bytes())));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = AdminToken::load_or_create(&path).unwrap();
        assert!(again.accepts(Some(format!("Bearer {}", text.trim()).as_bytes())));
        std::fs::write(&path, "tiny").unwrap();
        assert!(matches!(AdminToken::load_or_create(&path), Err(AuthError::TooShort(4))));
    }
}
