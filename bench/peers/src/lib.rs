//! What every peer shares: the command line (`PORT [deflate]`), the ready
//! line on stdout, and the exit codes the benchmark suite relies on.
//!
//! - stdout carries exactly one line, `listening <port>`, once the socket
//!   is bound; everything else goes to stderr;
//! - exit status 2: bad command line; 3: `deflate` asked of a peer that
//!   cannot compress (the suite skips that peer for deflate cases).

use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::exit;

/// The parsed command line.
#[derive(Debug, Clone, Copy)]
pub struct Args {
    /// Where to listen: 127.0.0.1 and the port given.
    pub addr: SocketAddr,
    /// Whether `deflate` was given.
    pub deflate: bool,
}

/// Parses `PORT [deflate]`. A peer without permessage-deflate passes
/// `supports_deflate = false` and exits with status 3 when asked for it.
pub fn args(name: &str, supports_deflate: bool) -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: {name} PORT [deflate]");
        exit(2);
    };
    let port: u16 = match argv.first().map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => usage(),
    };
    let deflate = match argv.get(1).map(String::as_str) {
        None => false,
        Some("deflate") => true,
        Some(_) => usage(),
    };
    if argv.len() > 2 {
        usage();
    }
    if deflate && !supports_deflate {
        eprintln!("{name}: permessage-deflate is not supported by this peer");
        exit(3);
    }
    Args {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        deflate,
    }
}

/// Prints the one ready line, `listening <port>`, and flushes it.
pub fn announce(port: u16) {
    let mut out = std::io::stdout().lock();
    // If stdout is gone nobody waits for the line; keep serving anyway.
    let _ = writeln!(out, "listening {port}");
    let _ = out.flush();
}

/// Prints a fatal error on stderr and exits with status 1.
pub fn fail(name: &str, what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("{name}: {what}: {err}");
    exit(1);
}

/// Most messages echoed in one batch before the replies are flushed, for
/// the peers whose API separates queueing (`feed`) from writing (`flush`).
/// The same bound yawc's own comparison benchmark uses.
pub const BATCH: usize = 32;

/// Reports a failed `accept` (say, out of file descriptors) and backs off
/// for 10 ms so the accept loop does not spin. Blocking is deliberate: the
/// runtime has nothing useful to do until descriptors free up, and the
/// peers keep tokio's time driver off, as the libraries' examples do.
pub fn accept_failed(name: &str, err: std::io::Error) {
    eprintln!("{name}: accept: {err}");
    std::thread::sleep(std::time::Duration::from_millis(10));
}

/// Runs the peer: a single-threaded tokio runtime listening on `args.addr`.
/// Prints the ready line, then spawns `handle(stream)` for every accepted
/// connection, with `TCP_NODELAY` set. Never returns.
pub fn serve<F, Fut>(name: &str, args: Args, handle: F) -> !
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap_or_else(|e| fail(name, "runtime", e));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .unwrap_or_else(|e| fail(name, "bind", e));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| fail(name, "bind", e))
            .port();
        announce(port);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                Err(e) => accept_failed(name, e),
            }
        }
    })
}
