//! Shared helpers for the tests of the real `walkie` binary: start a server
//! on 127.0.0.1:0 and read its port from the log, run `walkie` commands with
//! a time limit, raw HTTP and WebSocket over TCP, a throwaway PKI.
//!
//! Every child process is killed when its guard is dropped (on every path,
//! panics included), and every wait has a time limit.

#![allow(dead_code)]

pub mod chaos;

use std::ffi::OsString;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test.
pub const WALKIE: &str = env!("CARGO_BIN_EXE_walkie");

/// Fails the test instead of hanging.
pub async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test timed out after {secs} s"))
}

/// A `walkie` command with a clean environment: no `WALKIE_*` or `RUST_LOG`
/// inherited from whoever runs the tests, and a data directory of its own
/// (removed when the returned guard drops) unless the arguments or `envs`
/// choose where history goes.
fn command(
    program: &str,
    args: &[OsString],
    envs: &[(&str, &str)],
) -> (Command, Option<tempfile::TempDir>) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WALKIE_") || key == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let chosen = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == "--in-memory" || a.starts_with("--data-dir") || a.starts_with("--engine")
    }) || envs
        .iter()
        .any(|(k, _)| *k == "WALKIE_DATA_DIR" || *k == "WALKIE_IN_MEMORY");
    let data = (!chosen).then(|| tempfile::tempdir().expect("cannot create a data directory"));
    if let Some(dir) = &data {
        cmd.env("WALKIE_DATA_DIR", dir.path());
    }
    (cmd, data)
}

fn os_args<I, A>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Kills the child on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines read from a child's stderr by a background thread.
#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// The pipe reached EOF (the process exited).
    done: bool,
}

#[derive(Debug, Default)]
pub struct Log(Mutex<LogState>, Condvar);

impl Log {
    /// Reads `reader` line by line until EOF, in a thread.
    fn collect(reader: impl Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let shared = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                        shared.0.lock().unwrap().lines.push(text);
                        shared.1.notify_all();
                    }
                }
            }
            shared.0.lock().unwrap().done = true;
            shared.1.notify_all();
        });
        log
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits until a line satisfies `pred`; returns it, or `None` when the
    /// time is up or the stream ended without one.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.0.lock().unwrap();
        loop {
            if let Some(l) = state.lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if state.done || now >= deadline {
                return None;
            }
            state = self.1.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits for the stream to end (the process exited and closed it).
    fn wait_done(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.0.lock().unwrap();
        while !state.done {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.1.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// A running `walkie serve`, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: ChildGuard,
    /// The data directory the test gave it, if any; removed on drop (after
    /// the child is killed: fields drop in order).
    _data: Option<tempfile::TempDir>,
    pub port: u16,
    pub https: bool,
    log: Arc<Log>,
}

/// A configuration file holding `toml`, in a new temporary directory:
/// the directory (keep it while the file is used) and the file's path.
pub fn config_file(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walkie.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

impl Server {
    /// `walkie serve --bind 127.0.0.1:0 <args>` with `WALKIE_LOG=info`.
    pub fn start(args: &[&str]) -> Server {
        let mut all = vec!["serve", "--bind", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Server::spawn(all, &[])
    }

    /// [`Server::start`] with `--config` a file holding `toml`; the
    /// file's directory goes with it.
    pub fn with_config(toml: &str, args: &[&str]) -> (Server, tempfile::TempDir) {
        let (dir, path) = config_file(toml);
        let mut all = vec!["--config", path.as_str()];
        all.extend_from_slice(args);
        (Server::start(&all), dir)
    }

    /// [`Server::start`] with at most `open_files` file descriptors (soft
    /// and hard limit, through util-linux's `prlimit`).
    pub fn start_with_open_files(open_files: u64, args: &[&str]) -> Server {
        let nofile = format!("--nofile={open_files}:{open_files}");
        let mut all = vec![
            nofile.as_str(),
            "--",
            WALKIE,
            "serve",
            "--bind",
            "127.0.0.1:0",
        ];
        all.extend_from_slice(args);
        Server::spawn_program("prlimit", all, &[])
    }

    /// `walkie <args>` with `WALKIE_LOG=info` and `envs`; waits for the
    /// "walkie listening on" line and reads the port from it.
    pub fn spawn<I, A>(args: I, envs: &[(&str, &str)]) -> Server
    where
        I: IntoIterator<Item = A>,
        A: AsRef<std::ffi::OsStr>,
    {
        Server::spawn_program(WALKIE, args, envs)
    }

    /// [`Server::spawn`] with `program` run instead of walkie: one that
    /// runs walkie with the rest of `args`.
    pub fn spawn_program<I, A>(program: &str, args: I, envs: &[(&str, &str)]) -> Server
    where
        I: IntoIterator<Item = A>,
        A: AsRef<std::ffi::OsStr>,
    {
        let (mut cmd, data) = command(program, &os_args(args), envs);
        cmd.env("WALKIE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard(cmd.spawn().expect("cannot start walkie"));
        let log = Log::collect(child.0.stderr.take().unwrap());
        let Some(line) = log.wait_for(Duration::from_secs(15), |l| {
            l.contains("walkie listening on ")
        }) else {
            let status = child.0.try_wait();
            panic!(
                "walkie did not log its address (status {status:?}); log:\n{}",
                log.text()
            );
        };
        let (https, port) =
            parse_listening(&line).unwrap_or_else(|| panic!("cannot read the address in {line:?}"));
        Server {
            child,
            _data: data,
            port,
            https,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// `ws://127.0.0.1:PORT<path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lines()
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits up to 5 s for a log line containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> Option<String> {
        self.log.wait_for(Duration::from_secs(5), |l| {
            needles.iter().all(|n| l.contains(n))
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Sends a signal ("TERM", "INT") with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                // Let the reader thread collect the last lines.
                self.log.wait_done(Duration::from_secs(2));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts that the process is alive and that a new client on `/` gets
    /// `You said: ...` back.
    pub async fn assert_serves(&mut self, context: &str) {
        assert!(
            self.is_running(),
            "{context}: the server exited; log:\n{}",
            self.log_text()
        );
        let url = self.ws_url("/");
        let probe = format!("still there after {context}?");
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let mut ws = walkie::connect(&url).await?;
            ws.send(probe.as_str()).await?;
            let reply = ws.recv().await;
            let _ = ws.close(walkie::CloseCode::NORMAL, "").await;
            Ok::<_, walkie::Error>(reply)
        })
        .await;
        match answer {
            Ok(Ok(Some(Ok(m)))) => assert_eq!(
                m.as_text(),
                Some(format!("You said: {probe}").as_str()),
                "{context}"
            ),
            other => panic!(
                "{context}: a new client got {other:?}; log:\n{}",
                self.log_text()
            ),
        }
        assert!(self.is_running(), "{context}: the server exited");
    }
}

/// Reads `(https, port)` from `walkie listening on http://127.0.0.1:PORT/`.
fn parse_listening(line: &str) -> Option<(bool, u16)> {
    let rest = &line[line.find("walkie listening on ")? + "walkie listening on ".len()..];
    let (https, rest) = if let Some(r) = rest.strip_prefix("https://") {
        (true, r)
    } else {
        (false, rest.strip_prefix("http://")?)
    };
    // Loopback, or every address (which loopback reaches too).
    let rest = rest
        .strip_prefix("127.0.0.1:")
        .or_else(|| rest.strip_prefix("0.0.0.0:"))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((https, digits.parse().ok()?))
}

/// What a finished `walkie` command did.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `walkie <args>` with `stdin` (or none), and kills it if it takes
/// longer than `timeout` (which fails the test).
pub fn run_walkie<I, A>(
    args: I,
    envs: &[(&str, &str)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Run
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let args = os_args(args);
    let (mut cmd, _data) = command(WALKIE, &args, envs);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = ChildGuard(cmd.spawn().expect("cannot start walkie"));
    let out = Log::collect(child.0.stdout.take().unwrap());
    let err = Log::collect(child.0.stderr.take().unwrap());
    if let Some(input) = stdin {
        let mut pipe = child.0.stdin.take().unwrap();
        let input = input.to_vec();
        // A writer thread, so that a child that does not read cannot block us.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let deadline = start + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            panic!(
                "walkie {args:?} still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                out.text(),
                err.text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    out.wait_done(Duration::from_secs(2));
    err.wait_done(Duration::from_secs(2));
    let join = |l: &Log| l.lines().into_iter().map(|l| l + "\n").collect::<String>();
    Run {
        status,
        stdout: join(&out),
        stderr: join(&err),
        elapsed,
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP and WebSocket over TCP.

/// An HTTP response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Parses a response head and body (not chunked).
    pub fn parse(bytes: &[u8]) -> Option<HttpResponse> {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?;
        let status = status_line.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(HttpResponse {
            status,
            headers,
            body: body.to_owned(),
        })
    }
}

/// Reads until EOF, a reset or `timeout`, and returns what arrived. A reset
/// after the response is not an error here: a server that closes with
/// unread bytes resets the connection.
pub async fn read_all(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    buf
}

/// Sends `request` as is and reads the response until the server closes.
pub async fn http_exchange(port: u16, request: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The server may answer (and close) before it has read everything.
    let _ = stream.write_all(request).await;
    let bytes = read_all(&mut stream, Duration::from_secs(5)).await;
    HttpResponse::parse(&bytes).unwrap_or_else(|| {
        panic!(
            "no HTTP response to {:?}; got {:?}",
            String::from_utf8_lossy(&request[..request.len().min(200)]),
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// The key of RFC 6455 section 1.3 and its accept value.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket upgrade request for `path` with extra header lines (each
/// ending in `\r\n`).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A WebSocket connection driven by hand, frame by frame.
#[derive(Debug)]
pub struct RawWs {
    pub stream: TcpStream,
    /// The server's 101 response head.
    pub response: HttpResponse,
    buf: Vec<u8>,
}

/// A frame as received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawWs {
    /// Opens a TCP connection and completes the upgrade to `path`.
    pub async fn connect(port: u16, path: &str, extra_headers: &str) -> RawWs {
        let ws = RawWs::try_connect(port, path, extra_headers).await;
        ws.unwrap_or_else(|response| panic!("upgrade to {path} refused: {response:?}"))
    }

    /// [`RawWs::connect`], or the response head of a refusal.
    pub async fn try_connect(
        port: u16,
        path: &str,
        extra_headers: &str,
    ) -> Result<RawWs, HttpResponse> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(upgrade_request(path, extra_headers).as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("no handshake response in 5 s")
                .unwrap();
            assert!(n > 0, "EOF during the handshake: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let response = HttpResponse::parse(&buf[..head_end]).unwrap();
        if response.status != 101 {
            return Err(response);
        }
        assert_eq!(response.header("sec-websocket-accept"), Some(ACCEPT));
        let buf = buf.split_off(head_end);
        Ok(RawWs {
            stream,
            response,
            buf,
        })
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` on EOF or a reset.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, len)) = parse_frame(&self.buf) {
                self.buf.drain(..len);
                return Some(frame);
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame (within 5 s); returns its payload,
    /// or `None` if the connection ended without one.
    pub async fn read_close(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(f) = self.read_frame().await {
                if f.opcode == 0x8 {
                    return Some(f.payload);
                }
            }
            None
        })
        .await
        .expect("no close frame and no EOF within 5 s")
    }

    /// The code of the server's close frame.
    pub async fn close_code(&mut self) -> Option<u16> {
        let payload = self.read_close().await?;
        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
    }
}

/// Parses one unmasked server frame.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    assert_eq!(b1 & 0x80, 0, "the server masked a frame");
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    Some((
        Frame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0f,
            payload,
        },
        at,
    ))
}

/// The masking key of every hand-made client frame.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Encodes a frame: `b0` is FIN, RSV and opcode; the payload is masked with
/// [`MASK`] when `masked`.
pub fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![b0];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

// ---------------------------------------------------------------------------
// A throwaway PKI for TLS.

static PKI_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A CA and a certificate for `localhost` and `127.0.0.1` signed by it, as
/// PEM files in a temporary folder (removed on drop).
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!(
            "walkie-cli-tls-{}-{}",
            std::process::id(),
            PKI_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// `walkie serve` with this certificate.
    pub fn server(&self) -> Server {
        self.server_with(&[], &[])
    }

    /// `walkie serve` with this certificate, more flags and environment.
    pub fn server_with(&self, flags: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut args: Vec<std::ffi::OsString> = ["serve", "--bind", "127.0.0.1:0", "--tls-cert"]
            .iter()
            .map(Into::into)
            .collect();
        args.push(self.cert().into());
        args.push("--tls-key".into());
        args.push(self.key().into());
        args.extend(flags.iter().map(Into::into));
        Server::spawn(args, envs)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A path as a `&str` (the temp folder is ASCII on the test machines).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("non-UTF-8 path")
}

/// Waits until `server` logged `n` joins of rooms whose name contains
/// `room` (`""`: any room). A member's handshake completes before its
/// join does, and a message sent in between does not reach it.
pub async fn joined(server: &Server, room: &str, n: usize) {
    for _ in 0..500 {
        let count = server
            .log()
            .iter()
            .filter(|l| l.contains("joined room") && l.contains(room))
            .count();
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{n} members did not join {room} within 10 s; log:\n{}",
        server.log_text()
    );
}
