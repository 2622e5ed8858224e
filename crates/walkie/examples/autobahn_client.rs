//! The Autobahn TestSuite client agent: connects to a fuzzing server
//! (`kosoku -m fuzzingserver`), runs every case by echoing what it receives,
//! then asks the server to write its reports.
//!
//! ```text
//! cargo run --release --example autobahn_client -- ws://127.0.0.1:9001 walkie
//! ```

use std::time::Duration;

use walkie::{ClientConfig, DeflateConfig, Message};

async fn case_count(base: &str) -> walkie::Result<usize> {
    let mut ws = walkie::connect(&format!("{base}/getCaseCount")).await?;
    let count = match ws.recv().await {
        Some(Ok(Message::Text(t))) => t.trim().parse().unwrap_or(0),
        _ => 0,
    };
    let _ = ws.close(walkie::CloseCode::NORMAL, "").await;
    Ok(count)
}

async fn run_case(
    base: &str,
    agent: &str,
    case: usize,
    config: &ClientConfig,
) -> walkie::Result<()> {
    let url = format!("{base}/runCase?case={case}&agent={agent}");
    let (mut ws, _) = walkie::connect_with(&url, config).await?;
    while let Some(message) = ws.recv().await {
        // Queue the echo; it leaves with the next read's batch.
        ws.feed(message?).await?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> walkie::Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().unwrap_or_else(|| "ws://127.0.0.1:9001".into());
    let agent = args.next().unwrap_or_else(|| "walkie".into());

    let mut config = ClientConfig::default();
    // Offering client_no_context_takeover tells the server we accept being
    // asked to reset our compressor; Autobahn asks for it (cases 13.2, 13.5,
    // 13.6) only when the offer says so.
    let mut deflate = DeflateConfig::default();
    deflate.client_no_context_takeover = true;
    config.deflate = Some(deflate);
    // Cases 9.x send messages of up to 16 MiB.
    config.connection.max_message_size = 64 << 20;
    config.handshake_timeout = Duration::from_secs(30);

    let parallel: usize = std::env::var("AUTOBAHN_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let count = case_count(&base).await?;
    eprintln!("running {count} cases against {base} as {agent:?}, {parallel} at a time");
    // Many cases wait on purpose (slow sends, close deadlines): run a few
    // at once.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (next, base, agent, config) =
            (next.clone(), base.clone(), agent.clone(), config.clone());
        workers.spawn(async move {
            loop {
                let case = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if case > count {
                    return;
                }
                if let Err(e) = run_case(&base, &agent, case, &config).await {
                    // Failing the connection is what many cases expect.
                    eprintln!("case {case}: {e}");
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let mut ws = walkie::connect(&format!("{base}/updateReports?agent={agent}")).await?;
    let _ = ws.close(walkie::CloseCode::NORMAL, "").await;
    eprintln!("reports updated");
    Ok(())
}
