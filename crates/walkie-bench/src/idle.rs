//! Idle connections: open many, hold them, let the suite read the server's
//! memory.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::load::open;
use crate::wire::handshake;

/// How the idle run went.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct IdleOutcome {
    pub connected: usize,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// Opens `conns` WebSocket connections spread over `sources`, prints one
/// JSON line when they are all open, and holds them until stdin closes.
pub async fn run(addr: SocketAddr, path: String, conns: usize, sources: Vec<IpAddr>) {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let gate = Rc::new(tokio::sync::Semaphore::new(256));
            let mut tasks = Vec::with_capacity(conns);
            for i in 0..conns {
                let (gate, path) = (gate.clone(), path.clone());
                let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                tasks.push(tokio::task::spawn_local(async move {
                    let permit = gate.acquire().await;
                    let attempt = async {
                        let mut s = open(addr, source).await?;
                        handshake(&mut s, &addr.to_string(), &path, false, None).await?;
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
