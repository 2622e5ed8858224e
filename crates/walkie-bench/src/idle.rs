//! Idle connections: open many, hold them, let the suite read the server's
//! memory.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fanout::{CONNECT, WALKIE_PROTOCOL, command};
use crate::load::open;
use crate::wire::handshake;

/// How the idle run went.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct IdleOutcome {
    pub connected: usize,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// What to open.
pub struct Spec {
    pub addr: SocketAddr,
    pub path: String,
    pub conns: usize,
    /// Local addresses, used in turn.
    pub sources: Vec<IpAddr>,
    /// Speak the Walkie protocol and subscribe to this channel.
    pub channel: Option<String>,
}

/// Opens `conns` WebSocket connections spread over `sources`, prints one
/// JSON line when they are all open, and holds them until stdin closes.
pub async fn run(spec: Spec) {
    let Spec {
        addr,
        path,
        conns,
        sources,
        channel,
    } = spec;
    let channel: Option<Rc<str>> = channel.map(Rc::from);
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let gate = Rc::new(tokio::sync::Semaphore::new(256));
            let mut tasks = Vec::with_capacity(conns);
            for i in 0..conns {
                let (gate, path, channel) = (gate.clone(), path.clone(), channel.clone());
                let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                tasks.push(tokio::task::spawn_local(async move {
                    let permit = gate.acquire().await;
                    let attempt = async {
                        let mut s = open(addr, source).await?;
                        let protocol = channel.is_some().then_some(WALKIE_PROTOCOL);
                        let (_, leftover) =
                            handshake(&mut s, &addr.to_string(), &path, false, protocol).await?;
                        if let Some(channel) = &channel {
                            subscribe(&mut s, leftover, channel).await?;
                        }
                        Ok::<_, std::io::Error>(s)
                    };
                    let r = tokio::time::timeout(Duration::from_secs(60), attempt).await;
                    drop(permit);
                    match r {
                        Ok(Ok(s)) => Ok(s),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("connect or handshake timed out".to_owned()),
                    }
                }));
            }
            let mut open_conns = Vec::with_capacity(conns);
            let mut outcome = IdleOutcome {
                connected: 0,
                errors: 0,
                first_error: None,
            };
            for t in tasks {
                match t.await {
                    Ok(Ok(s)) => open_conns.push(s),
                    Ok(Err(e)) => {
                        outcome.errors += 1;
                        outcome.first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        outcome.errors += 1;
                        outcome.first_error.get_or_insert(e.to_string());
                    }
                }
            }
            outcome.connected = open_conns.len();
            println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
            // Hold until the suite closes our stdin.
            let mut sink = [0u8; 64];
            let _ = tokio::io::stdin().read(&mut sink).await;
            drop(open_conns);
        })
        .await;
}

/// Connects anonymously and subscribes to `channel`, and waits for the
/// subscription's reply (`"id":1`): the session is then fully set up.
async fn subscribe(s: &mut TcpStream, leftover: Vec<u8>, channel: &str) -> std::io::Result<()> {
    let subscribe = serde_json::json!({"id": 1, "subscribe": {"channel": channel}});
    let mut out = command(CONNECT);
    out.extend(command(&subscribe.to_string()));
    s.write_all(&out).await?;
    // The server's frames are small and unmasked: looking for the reply's
    // id in the bytes is enough.
    let mut seen = leftover;
    let mut buf = [0u8; 4096];
    loop {
        if seen.windows(7).any(|w| w == br#""error""#) {
            let text = String::from_utf8_lossy(&seen).into_owned();
            return Err(std::io::Error::other(format!("subscribe refused: {text}")));
        }
        if seen.windows(6).any(|w| w == br#""id":1"#) {
            break;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
