//! A `needle serve` process on loopback for the end-to-end tests, and a minimal HTTP/1.1 client.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The admin token the test servers are started with; [`post`] sends it.
pub const TOKEN: &str = "test-admin-token-0123456789";

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// A server guarded by [`TOKEN`].
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Server::start_as(dir, &[args, &["--admin-token", TOKEN]].concat())
    }

    pub fn start_as(dir: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_needle"))
            .args(["--threads", "2", "serve", "--addr", "127.0.0.1:0", "--log-level", "warn"])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("needle serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}")).to_owned();
        Server { child, addr }
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A 4xx whose JSON error message contains `needle`.
    pub fn rejects(&self, status: u16, needle: &str) {
        let v = self.json();
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert_eq!(self.status, status, "{msg}");
        assert_eq!(v["error"]["status"], status);
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    }
}

pub fn http(addr: &str, method: &str, path: &str, body: &[u8], extra_headers: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra_headers}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before reading an oversize body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a full response");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    Reply { status, headers, body: raw[split + 4..].to_vec() }
}

/// The server's `/metrics` text.
pub fn metrics_text(addr: &str) -> String {
    let r = http(addr, "GET", "/metrics", b"", "");
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The header line that presents `token`.
pub fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

/// A POST with the admin token.
pub fn post(addr: &str, path: &str, v: &Value) -> Reply {
    http(addr, "POST", path, v.to_string().as_bytes(), &bearer(TOKEN))
}

pub fn ids(v: &Value) -> Vec<String> {
    v["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}
