//! `walkie connect`: a terminal client that works in pipes.
//!
//! Each line of stdin is sent as a message; each message received is
//! printed on its own line. When stdin ends, it waits for as many messages as
//! it sent (or `--count`), then closes with 1000 and exits.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use walkie::{ClientConfig, CloseCode, DeflateConfig, Message};

use crate::units::parse_positive_duration;

/// Exit codes scripts can rely on.
mod exit {
    /// Everything expected arrived.
    pub const OK: u8 = 0;
    /// Could not connect, or the handshake failed.
    pub const CONNECT: u8 = 1;
    /// Bad usage (clap also uses 2).
    pub const USAGE: u8 = 2;
    /// The expected replies did not arrive within --timeout.
    pub const TIMEOUT: u8 = 3;
    /// The connection closed or failed before the expected replies.
    pub const CLOSED: u8 = 4;
}

/// Options of `walkie connect`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The server's URL: ws://host:port/path or wss://...
    pub url: String,

    /// Exit after receiving this many messages (default: as many as the
    /// lines sent, once stdin ends).
    #[arg(short = 'n', long)]
    pub count: Option<usize>,

    /// How long to wait for the connection, and for replies once stdin ends
    /// (with --no-stdin and -n: for the messages, from the start).
    #[arg(short = 't', long, default_value = "10s", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// Do not read stdin: only print what arrives (until --count or close).
    #[arg(long)]
    pub no_stdin: bool,

    /// Send lines as binary messages instead of text.
    #[arg(long)]
    pub binary: bool,

    /// Subprotocol to offer (repeatable).
    #[arg(long = "protocol", value_name = "NAME")]
    pub protocols: Vec<String>,

    /// Extra request header, "Name: value" (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,

    /// Offer permessage-deflate compression.
    #[arg(long)]
    pub deflate: bool,

    /// PEM file of CA certificates to trust for wss:// (instead of the
    /// public roots).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,

    /// Accept any server certificate for wss:// (local tests only).
    #[arg(short = 'k', long)]
    pub insecure: bool,

    /// Speak the Walkie protocol (URL: the server's /ws) and subscribe to
    /// this channel (repeatable). Each publication is printed as a JSON
    /// line; stdin lines are published to the first channel (as JSON when
    /// they parse, as a string otherwise). Reconnects and recovers by itself.
    #[arg(short = 's', long = "subscribe", value_name = "CHANNEL")]
    pub subscribe: Vec<String>,

    /// With --subscribe: replay the last N messages of each channel first.
    #[arg(long, value_name = "N", requires = "subscribe")]
    pub history: Option<usize>,

    /// With --subscribe: a JWT to connect with.
    #[arg(long, env = "WALKIE_TOKEN", requires = "subscribe")]
    pub token: Option<String>,
}

fn client_config(args: &ConnectArgs) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::default();
    config.connect_timeout = args.timeout;
    config.handshake_timeout = args.timeout;
    config.protocols = args.protocols.clone();
    if args.deflate {
        config.deflate = Some(DeflateConfig::default());
    }
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            return Err(format!("--header {h:?}: expected \"Name: value\""));
        };
        config
            .headers
            .push((name.trim().to_owned(), value.trim().to_owned()));
    }
    config.tls = tls_client(args.ca.as_deref(), args.insecure)?;
    Ok(config)
}

/// The TLS settings of `--ca` and `-k` (`None`: the system's roots), for
/// `walkie connect` and `walkie publish`.
pub fn tls_client(
    ca: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>, String> {
    match (ca, insecure) {
        (Some(ca), _) => walkie::tls::client_config_with_ca(ca)
            .map(Some)
            .map_err(|e| format!("--ca: {e}")),
        (None, true) => walkie::tls::insecure_client_config()
            .map(Some)
            .map_err(|e| e.to_string()),
        (None, false) => Ok(None),
    }
}

fn print(message: &Message) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head -1`) is not worth failing over.
    let _ = out.write_all(message.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Runs the client; the exit code says how it went.
pub async fn run(args: ConnectArgs) -> ExitCode {
    let config = match client_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walkie connect: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if !args.subscribe.is_empty() {
        return ExitCode::from(channels(&args, config).await);
    }
    // No high-water mark: over one, the connection stops reading while a
    // write waits (against peers that send but never read), and a line
    // longer than the mark would stop us reading an echoing server that
    // waits for us. Stdin is read only once the previous line went out
    // (below), so the queue holds one line and control frames.
    let mut config = config;
    config.write_buffer_high = usize::MAX;
    let ws = match walkie::connect_with(&args.url, &config).await {
        Ok((ws, _)) => ws,
        Err(walkie::Error::InvalidUrl(e)) => {
            eprintln!("walkie connect: invalid URL {e}");
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            eprintln!("walkie connect: {}: {e}", args.url);
            return ExitCode::from(exit::CONNECT);
        }
    };

    // Reading goes on while a line goes out: an echoing server may wait
    // for us to read its answers before it reads on, and a client that
    // only read between sends would then wait on it forever. Stdin is read
    // again once the previous line was written, so one line at a time is
    // in memory.
    let (mut reader, mut writer) = ws.split();
    let mut writing = false;
    // Split on bytes, not on UTF-8 lines: with --binary any bytes may come.
    let mut lines = BufReader::new(tokio::io::stdin()).split(b'\n');
    let mut line_no = 0usize;
    let mut stdin_open = !args.no_stdin;
    let (mut sent, mut received) = (0usize, 0usize);
    let mut deadline = (!stdin_open).then(|| tokio::time::Instant::now() + args.timeout);
    let code = loop {
        let target = args.count.or((!stdin_open).then_some(sent));
        if target.is_some_and(|t| received >= t) && (args.count.is_some() || !stdin_open) {
            break exit::OK;
        }
        tokio::select! {
            line = lines.next_segment(), if stdin_open && !writing => match line {
                Ok(Some(mut line)) => {
                    line_no += 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    let message = if args.binary {
                        Message::binary(line)
                    } else {
                        match String::from_utf8(line) {
                            Ok(text) => Message::text(text),
                            Err(_) => {
                                eprintln!("walkie connect: stdin line {line_no} is not valid UTF-8; use --binary to send bytes");
                                break exit::USAGE;
                            }
                        }
                    };
                    if let Err(e) = writer.feed(message).await {
                        eprintln!("walkie connect: send failed: {e}");
                        break exit::CLOSED;
                    }
                    writing = true;
                    sent += 1;
                }
                Ok(None) => {
                    stdin_open = false;
                    deadline = Some(tokio::time::Instant::now() + args.timeout);
                }
                Err(e) => {
                    eprintln!("walkie connect: reading stdin: {e}");
                    break exit::USAGE;
                }
            },
            written = writer.flush(), if writing => match written {
                Ok(()) => writing = false,
                Err(e) => {
                    eprintln!("walkie connect: send failed: {e}");
                    break exit::CLOSED;
                }
            },
            message = reader.recv() => match message {
                Some(Ok(m)) => {
                    print(&m);
                    received += 1;
                }
                Some(Err(e)) => {
                    eprintln!("walkie connect: connection failed: {e}");
                    break exit::CLOSED;
                }
                None => {
                    let frame = reader.close_frame();
                    let frame = frame.as_ref();
                    let why = frame.map(|f| f.to_string()).unwrap_or_else(|| "no status".into());
                    // Closed by the server: fine only if it was a normal
                    // close after everything expected arrived. While stdin
                    // is open more lines may come, so nothing was complete
                    // yet (--count ends the loop above once reached).
                    let normal = frame.is_none_or(|f| matches!(f.code.0, 1000 | 1001));
                    let expected = args.count.unwrap_or(sent);
                    if normal && !stdin_open && received >= expected {
                        eprintln!("walkie connect: closed by the server ({why})");
                        break exit::OK;
                    }
                    eprintln!("walkie connect: closed by the server ({why}) after {received} message(s)");
                    break exit::CLOSED;
                }
            },
            () = sleep_until(deadline) => {
                eprintln!(
                    "walkie connect: timed out after {:?} with {received} of {} message(s)",
                    args.timeout,
                    args.count.unwrap_or(sent)
                );
                break exit::TIMEOUT;
            }
        }
    };
    if code != exit::CLOSED {
        // Our close frame, then whatever arrives until the server's answer.
        let close = async {
            writer.close(CloseCode::NORMAL, "").await?;
            while reader.recv().await.is_some() {}
            Ok::<_, walkie::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
    ExitCode::from(code)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// `walkie connect --subscribe`: the Walkie protocol through the library's
/// client. Exits after --count publications, or once stdin ended, every
/// line was acknowledged and every subscription answered (with --no-stdin
/// and no --count: until Ctrl-C or a final close).
async fn channels(args: &ConnectArgs, config: ClientConfig) -> u8 {
    use walkie_hub::client::{Client, ClientError, ClientEvent, Options, SubscribeOptions};

    if let Err(e) = walkie::WsUrl::parse(&args.url) {
        eprintln!("walkie connect: invalid URL {e}");
        return exit::USAGE;
    }
    let mut options = Options::new(args.url.clone());
    options.token = args.token.clone();
    options.websocket = config;
    let (client, mut events) = Client::start(options);
    for channel in &args.subscribe {
        let sub = SubscribeOptions {
            history: args.history,
            token: None,
        };
        match client.subscribe(channel, sub).await {
            // The same channel given twice.
            Ok(()) | Err(ClientError::AlreadySubscribed { .. }) => {}
            Err(e) => {
                // The client ended: why is in its last events.
                while let Ok(event) = events.try_recv() {
                    if let ClientEvent::Disconnected { code, reason, .. } = event {
                        eprintln!("walkie connect: disconnected ({code} {reason})");
                    }
                }
                eprintln!("walkie connect: cannot subscribe to {channel}: {e}");
                return exit::CONNECT;
            }
        }
    }
    let target = args.subscribe[0].clone();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = !args.no_stdin;
    let mut received = 0usize;
    let mut acks = tokio::task::JoinSet::new();
    // Not done before every subscription is answered: a refused one is
    // an error even with nothing to send.
    let mut unanswered: std::collections::HashSet<&str> =
        args.subscribe.iter().map(String::as_str).collect();
    // With nothing to send, --count's messages are waited for from the
    // start (as without --subscribe).
    let mut deadline =
        (args.no_stdin && args.count.is_some()).then(|| tokio::time::Instant::now() + args.timeout);
    let mut ever_connected = false;
    let connect_deadline = tokio::time::Instant::now() + args.timeout;
    let code = loop {
        if args.count.is_some_and(|n| received >= n) {
            break exit::OK;
        }
        if args.count.is_none()
            && !stdin_open
            && !args.no_stdin
            && acks.is_empty()
            && unanswered.is_empty()
        {
            break exit::OK;
        }
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let line = line.trim_end_matches('\r').to_owned();
                    let data = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                    let (c, ch) = (client.clone(), target.clone());
                    acks.spawn(async move { c.publish(&ch, data).await });
                }
                Ok(None) => {
                    stdin_open = false;
                    deadline = Some(tokio::time::Instant::now() + args.timeout);
                }
                Err(e) => {
                    eprintln!("walkie connect: reading stdin: {e}");
                    break exit::USAGE;
                }
            },
            Some(done) = acks.join_next(), if !acks.is_empty() => {
                if let Ok(Err(e)) = done {
                    eprintln!("walkie connect: publish failed: {e}");
                    // Never connected (a refused token, say): as when the
                    // refusal comes first.
                    break if ever_connected { exit::CLOSED } else { exit::CONNECT };
                }
            }
            event = events.recv() => match event {
                Some(ClientEvent::Publication { channel, offset, data, .. }) => {
                    let line = serde_json::json!({"channel": channel, "offset": offset, "data": data});
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    received += 1;
                }
                Some(ClientEvent::Connected { .. }) => ever_connected = true,
                Some(ClientEvent::Subscribed { channel, .. }) => {
                    unanswered.remove(channel.as_str());
                }
                Some(ClientEvent::SubscribeFailed { channel, error, retrying: true, .. }) => {
                    eprintln!("walkie connect: cannot subscribe to {channel} yet: {error}; retrying");
                }
                Some(ClientEvent::SubscribeFailed { channel, error, .. }) => {
                    eprintln!("walkie connect: cannot subscribe to {channel}: {error}");
                    break exit::CLOSED;
                }
                Some(ClientEvent::RecoveryFailed { channel }) => {
                    eprintln!("walkie connect: {channel}: messages were missed while disconnected (history did not cover the gap)");
                }
                Some(ClientEvent::Disconnected { code, reason, reconnecting }) => {
                    eprintln!("walkie connect: disconnected ({code} {reason}){}", if reconnecting { "; reconnecting" } else { "" });
                    if !reconnecting {
                        break if ever_connected { exit::CLOSED } else { exit::CONNECT };
                    }
                }
                Some(_) => {}
                None => break exit::CLOSED,
            },
            () = sleep_until(deadline) => {
                eprintln!("walkie connect: timed out after {:?} with {received} message(s)", args.timeout);
                break exit::TIMEOUT;
            }
            () = tokio::time::sleep_until(connect_deadline), if !ever_connected => {
                eprintln!("walkie connect: {}: not connected within {:?}", args.url, args.timeout);
                break exit::CONNECT;
            }
        }
    };
    client.stop();
    // Let the close frame go out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    code
}
