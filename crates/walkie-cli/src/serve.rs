//! `walkie serve`: accept connections, route them, shut down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use walkie::{Incoming, ServerConfig};

use walkie_hub::{
    Broker, ChannelName, DurableBroker, HistoryOptions, Hub, HubConfig, MemoryBroker,
    NamespaceConfig, Node, OverflowPolicy, QueueLimits, Verifier,
};

use crate::limits::{self, Admission};
use crate::rooms::RoomSettings;
use crate::shutdown::ShutdownWakers;
use crate::units::{
    Toggle, parse_duration, parse_optional_duration, parse_positive_duration, parse_size,
};
use crate::{handlers, http, rooms, ws};

/// Options of `walkie serve`. Every flag also reads an environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "WALKIE_BIND", default_value = "127.0.0.1:3000")]
    pub bind: SocketAddr,

    /// PEM certificate chain: serve wss:// and https:// (needs --tls-key).
    #[arg(long, env = "WALKIE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "WALKIE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Largest message accepted, after decompression (e.g. 64K, 16M).
    #[arg(long, env = "WALKIE_MAX_MESSAGE_SIZE", default_value = "16M", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Largest frame accepted (e.g. 1M).
    #[arg(long, env = "WALKIE_MAX_FRAME_SIZE", default_value = "16M", value_parser = parse_size)]
    pub max_frame_size: usize,

    /// Do not accept permessage-deflate compression.
    #[arg(long, env = "WALKIE_NO_DEFLATE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_deflate: bool,

    /// Ping a quiet client after this long; `off` disables keepalive.
    #[arg(long, env = "WALKIE_PING_INTERVAL", default_value = "20s", value_parser = parse_optional_duration)]
    pub ping_interval: Toggle,

    /// Close a client that has not answered a keepalive ping within this long.
    #[arg(long, env = "WALKIE_PING_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    pub ping_timeout: Duration,

    /// Close a client from which nothing arrived for this long (1001), pongs
    /// included: with keepalive pings on, a client that answers them is
    /// never idle. `off` disables it.
    #[arg(long, env = "WALKIE_IDLE_TIMEOUT", default_value = "off", value_parser = parse_optional_duration)]
    pub idle_timeout: Toggle,

    /// Time a client has, from connecting, to finish the TLS handshake (with
    /// --tls-cert) and send its request head (then 408). More than 0.
    #[arg(long, env = "WALKIE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,

    /// On Ctrl-C or SIGTERM, time given to connections to close (with 1001)
    /// and to HTTP requests in flight to be answered, before the process
    /// exits anyway; 0 exits at once.
    #[arg(long, env = "WALKIE_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Worker threads, each with its own event loop and listening socket
    /// on the address (default: one per available core).
    #[arg(long, env = "WALKIE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// A TOML file with auth and channel namespaces for the Walkie protocol
    /// at /ws (see docs/protocol.md). Without one: anonymous clients, tokens
    /// from /demo/token, and the namespaces protocol.md lists for that case.
    #[arg(long, short = 'c', env = "WALKIE_CONFIG")]
    pub config: Option<PathBuf>,

    /// The key backends give the HTTP API (`Authorization: apikey KEY`);
    /// overrides auth.api_key in --config. Without one the API is off.
    #[arg(long, env = "WALKIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Directory for durable data (room history). Default:
    /// $XDG_DATA_HOME/walkie, else ~/.local/share/walkie. Not with
    /// --engine, which keeps history itself.
    #[arg(long, env = "WALKIE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// An external engine shared by several walkie nodes:
    /// redis://HOST:PORT/DB (history, pub/sub and presence in Redis), or
    /// nats://HOST:PORT[?replicas=N] (history in JetStream, a stream per
    /// channel with N replicas, default 1; delivery over NATS; presence in
    /// a key-value bucket; streams empty for an hour are deleted). Not with
    /// --data-dir or --in-memory: the engine keeps history.
    #[arg(long, env = "WALKIE_ENGINE", hide_env_values = true)]
    pub engine: Option<String>,

    /// Prefix of every key and channel the engine uses in Redis, and of
    /// every subject, stream and bucket in NATS (there, characters other
    /// than letters, digits, - and _ become _).
    #[arg(long, env = "WALKIE_ENGINE_PREFIX", default_value = "walkie:")]
    pub engine_prefix: String,

    /// With --engine: how long a node's presence entries live in the engine
    /// unless the node refreshes them (it does every third of this); the
    /// members of a node that dies disappear from presence within it.
    #[arg(long, env = "WALKIE_PRESENCE_TTL", default_value = "60s", value_parser = parse_presence_ttl, requires = "engine")]
    pub presence_ttl: Duration,

    /// Keep history in memory only: nothing is written to disk, and history
    /// is lost on restart.
    #[arg(long, env = "WALKIE_IN_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    pub in_memory: bool,

    /// Messages of history kept per room; `?history=N` may ask for at most
    /// this (more is a 400). Default: the `rooms` namespace's history_size
    /// (100 without a --config, or if it has no such namespace). Given, it
    /// becomes that namespace's history_size too, so that /ws and HTTP API
    /// publishes to a room keep as many.
    #[arg(long, env = "WALKIE_ROOM_HISTORY", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub room_history: Option<u32>,

    /// How long a room keeps a message in its history (more than 0).
    /// Default: the `rooms` namespace's history_ttl (24h without one);
    /// given, it becomes that namespace's history_ttl too.
    #[arg(long, env = "WALKIE_ROOM_HISTORY_TTL", value_parser = parse_positive_duration)]
    pub room_history_ttl: Option<Duration>,

    /// Most messages waiting to be sent to one client; a client that falls
    /// further behind is disconnected (1013) and may reconnect.
    #[arg(long, env = "WALKIE_CLIENT_QUEUE", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..))]
    pub client_queue: u32,

    /// Most bytes waiting to be sent to one client (same policy).
    #[arg(long, env = "WALKIE_CLIENT_QUEUE_BYTES", default_value = "4M", value_parser = parse_size)]
    pub client_queue_bytes: usize,

    /// Most messages one connection may publish per second of the clock
    /// (`off`: no limit): `/ws` publishes past it are answered with error
    /// 114 and not published; a room member's next messages are read in
    /// the next second. The HTTP API is not limited.
    #[arg(long, env = "WALKIE_CLIENT_PUBLISH_RATE", default_value = "off", value_parser = crate::limits::parse_publish_rate)]
    pub client_publish_rate: crate::limits::PublishRate,

    /// Most WebSocket connections open at once; past it an upgrade is
    /// answered 503. `auto`: the open-file limit (raised to its hard limit
    /// at start) less the descriptors in use at start and a reserve of a
    /// quarter of it, at most 256. `off`: no limit but the open-file one.
    #[arg(long, env = "WALKIE_MAX_CONNECTIONS", default_value = "auto", value_parser = crate::limits::parse_max_connections)]
    pub max_connections: crate::limits::MaxConnections,

    /// Write logs as JSON lines instead of text. Filter with WALKIE_LOG or
    /// RUST_LOG (e.g. `debug`, `walkie=trace`).
    #[arg(long, env = "WALKIE_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
}

impl ServeArgs {
    /// Flags that cannot go together. Checked here rather than by clap,
    /// which counts a flag set from the environment as given even when it
    /// says false (`WALKIE_IN_MEMORY=0`).
    fn conflict(&self) -> Option<String> {
        let engine = self.engine.is_some();
        let clash = |a: &str, b: &str| format!("{a} cannot be used with {b}");
        if engine && self.in_memory {
            return Some(clash("--engine", "--in-memory: the engine keeps history"));
        }
        if engine && self.data_dir.is_some() {
            return Some(clash("--engine", "--data-dir: the engine keeps history"));
        }
        (self.in_memory && self.data_dir.is_some())
            .then(|| clash("--in-memory", "--data-dir: history is kept in memory only"))
    }

    fn server_config(&self) -> Result<ServerConfig, String> {
        let mut config = ServerConfig::default();
        config.connection.max_message_size = self.max_message_size;
        config.connection.max_frame_size = self.max_frame_size;
        config.connection.ping_interval = self.ping_interval.0;
        config.connection.ping_timeout = self.ping_timeout;
        config.connection.idle_timeout = self.idle_timeout.0;
        config.handshake_timeout = self.handshake_timeout;
        if self.no_deflate {
            config.deflate = None;
        }
        // The settings' field names match the flags: name the flag.
        config.connection.validate().map_err(|e| {
            format!(
                "invalid value for --{}: {}",
                e.field.replace('_', "-"),
                e.reason
            )
        })?;
        Ok(config)
    }
}

/// What every connection task needs.
#[derive(Debug)]
pub struct AppState {
    pub config: ServerConfig,
    /// Shutdown for the accept loops and the server's own tasks; begin it
    /// with [`AppState::shut_down`], which also wakes `shutdown_wakers`.
    pub shutdown: CancellationToken,
    /// The open WebSocket connections waiting for shutdown (a few bytes
    /// each where `shutdown.cancelled()` costs 72).
    pub shutdown_wakers: ShutdownWakers,
    /// Channels and fan-out, shared by every worker thread.
    pub hub: Hub,
    /// What Walkie protocol sessions share: the hub, auth, namespaces.
    pub node: Arc<Node>,
    /// The HTTP API's key (`--api-key`, else `auth.api_key`); no API
    /// without one.
    pub api_key: Option<String>,
    /// Without a configuration file: the secret /demo/token signs with.
    pub demo_secret: Option<String>,
    pub rooms: RoomSettings,
    /// Every connection's task, waited for on shutdown.
    pub tracker: TaskTracker,
    /// `--shutdown-timeout`: how long a request in flight at shutdown may
    /// take to be answered.
    pub shutdown_timeout: Duration,
    /// `--max-connections`.
    pub admission: Admission,
}

impl AppState {
    /// Begins shutdown: everything waiting on `shutdown` or on
    /// `shutdown_wakers` is woken.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        self.shutdown_wakers.fire();
    }
}

impl ServeArgs {
    /// One history for rooms, whoever publishes to them: a member (trimmed
    /// by the settings this returns) or `/ws` and the HTTP API (trimmed by
    /// the namespace of `rooms:` channels). `--room-history` and
    /// `--room-history-ttl` default to that namespace's; given, they are
    /// written into it. Without a `rooms` namespace, only members publish
    /// to rooms (`/ws` and the API refuse the channels): the flags, or 100
    /// messages for 24 hours. `None`: rooms keep no history.
    fn room_history(&self, config: &mut HubConfig) -> Option<HistoryOptions> {
        let room = ChannelName::new("rooms:_").expect("a valid channel name");
        let Some(ns) = config.namespace(&room).cloned() else {
            return Some(HistoryOptions {
                size: self.room_history.map_or(100, |n| n as usize),
                ttl: self
                    .room_history_ttl
                    .unwrap_or(NamespaceConfig::default().history_ttl),
            });
        };
        if self.room_history.is_none() && self.room_history_ttl.is_none() {
            return ns.history();
        }
        let ns = config.namespaces.entry("rooms".into()).or_insert(ns);
        if let Some(n) = self.room_history {
            ns.history_size = n as usize;
        }
        if let Some(ttl) = self.room_history_ttl {
            ns.history_ttl = ttl;
        }
        ns.history()
    }

    fn room_settings(&self, history: Option<HistoryOptions>) -> RoomSettings {
        RoomSettings {
            history,
            queue: QueueLimits {
                messages: self.client_queue as usize,
                bytes: self.client_queue_bytes,
                policy: OverflowPolicy::Disconnect,
            },
            publish_rate: self.client_publish_rate.0,
        }
    }

    /// The engine: an external one (--engine), history in the data
    /// directory, or in memory; and presence, when the engine keeps it.
    fn broker(&self, rt: &tokio::runtime::Runtime) -> Result<Engine, String> {
        if let Some(url) = &self.engine {
            // Shown only with its user info hidden: the log goes to the
            // open `dashboard:logs` channel too.
            let shown = redact_user_info(url);
            let failed = |e: walkie_hub::EngineError| engine_error(&shown, &e);
            if url.starts_with("nats://") {
                let broker = rt
                    .block_on(walkie_hub::NatsBroker::connect(url, &self.engine_prefix))
                    .map_err(failed)?;
                let presence = walkie_hub::NatsPresence::new(&broker, self.presence_ttl);
                rt.block_on(presence.open()).map_err(failed)?;
                rt.spawn(delete_idle_streams(broker.clone()));
                return Ok((
                    Arc::new(broker),
                    Some(Arc::new(presence)),
                    format!("in NATS JetStream at {shown}"),
                ));
            }
            if !url.starts_with("redis://") {
                return Err(format!(
                    "--engine {shown}: give redis://HOST:PORT or nats://HOST:PORT"
                ));
            }
            let broker = rt
                .block_on(walkie_hub::RedisBroker::connect(url, &self.engine_prefix))
                .map_err(failed)?;
            let presence = walkie_hub::RedisPresence::new(&broker, self.presence_ttl);
            return Ok((
                Arc::new(broker),
                Some(Arc::new(presence)),
                format!("in Redis at {shown}"),
            ));
        }
        if self.in_memory {
            return Ok((Arc::new(MemoryBroker::new()), None, "in memory".into()));
        }
        let dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir().ok_or(
                "no home directory for the default data directory: give --data-dir or --in-memory",
            )?,
        };
        match DurableBroker::open(&dir) {
            Ok(b) => {
                let where_ = format!("in {}", b.path().display());
                Ok((Arc::new(b), None, where_))
            }
            Err(e) => Err(format!(
                "--data-dir: {e} (give another --data-dir, or --in-memory)"
            )),
        }
    }
}

/// The broker, the presence manager if the engine has one, and where
/// history is kept (for the log).
type Engine = (
    Arc<dyn Broker>,
    Option<Arc<dyn walkie_hub::PresenceManager>>,
    String,
);

/// The name of the demo tokens' secret in an engine.
const DEMO_SECRET: &str = "demo-tokens";

/// `--engine URL: ERROR`, with user info hidden in both: the engines'
/// errors repeat the URL they were given, password included.
fn engine_error(shown: &str, e: &walkie_hub::EngineError) -> String {
    // On one line: a client's parse error may span several (`redis://` to
    // a port that speaks another protocol).
    let e = e
        .to_string()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    format!("--engine {shown}: {}", redact_user_info(&e))
}

/// `text` with the user info (`user:password@`, `:password@`, `token@`) of
/// every URL in it replaced by `***@`. Engine URLs may carry a password,
/// and whatever is logged at INFO is also published to the dashboard's
/// open log channel. A URL's authority ends at `/`, `?`, `#`, white space
/// or the next URL of a list (NATS takes `nats://a,nats://b`); as none of
/// these may appear in user info, a password is never cut in two.
fn redact_user_info(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (scheme, after) = rest.split_at(i + "://".len());
        out.push_str(scheme);
        let authority = &after[..authority_end(after)];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority.len()..];
    }
    out.push_str(rest);
    out
}

/// The length of the authority at the start of `s` (what follows `://`).
fn authority_end(s: &str) -> usize {
    let delimiter = s
        .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
        .unwrap_or(s.len());
    // The next URL starts with its scheme, just before its `://`.
    let next_url = s.find("://").map_or(s.len(), |i| {
        s[..i]
            .trim_end_matches(|c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .len()
    });
    delimiter.min(next_url)
}

/// The hub's configuration from `--config`, or the built-in one.
fn load_hub_config(path: Option<&std::path::Path>) -> Result<HubConfig, String> {
    let Some(path) = path else {
        return Ok(HubConfig::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    HubConfig::from_toml(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// $XDG_DATA_HOME/walkie, else ~/.local/share/walkie.
fn default_data_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })?;
    Some(base.join("walkie"))
}

/// Runs the server until Ctrl-C or SIGTERM.
///
/// Thread per core: each worker thread runs its own single-threaded tokio
/// runtime with its own listening socket on the same address
/// (`SO_REUSEPORT`, see [`bind_all`]), and the kernel spreads new
/// connections over them. A connection lives on one thread for its whole
/// life: no work stealing, no cross-thread wake-ups, and each thread serves
/// its ready connections in turn. The main thread only waits for signals.
pub fn run(args: ServeArgs) -> ExitCode {
    if let Some(e) = args.conflict() {
        eprintln!("walkie: {e}");
        return ExitCode::from(2);
    }
    // First: history files and engine connections count too.
    let open_files = limits::raise_open_files();
    let config = match args.server_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walkie: {e}");
            return ExitCode::from(2);
        }
    };
    // Reloaded on SIGHUP (see `reload.rs`).
    let certificate = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match walkie::tls::ReloadableCert::load(cert, key) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("walkie: --tls-cert/--tls-key: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let tls = match certificate.clone().map(walkie::tls::server_config_with) {
        Some(Ok(c)) => Some(tokio_rustls::TlsAcceptor::from(c)),
        Some(Err(e)) => {
            eprintln!("walkie: --tls-cert/--tls-key: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(name)
            .build()
    };
    let main_rt = match runtime("walkie-main") {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walkie: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (broker, presence, history_at) = match args.broker(&main_rt) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("walkie: {e}");
            return ExitCode::from(2);
        }
    };
    let mut hub_config = match load_hub_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walkie: {e}");
            return ExitCode::from(2);
        }
    };
    let room_history = args.room_history(&mut hub_config);
    // Without a configuration file the server runs for development: every
    // channel is open, and /demo/token hands out tokens signed with a
    // secret made up for this run, so that the demo pages can show user
    // channels. A configuration file turns both off. Nodes sharing an
    // engine share the secret too (the first made it, in the engine), so
    // that a token from one works on all: a client reconnects to any.
    let demo_secret = match args.config {
        Some(_) => None,
        None => match main_rt.block_on(broker.shared_secret(DEMO_SECRET)) {
            Ok(shared) => {
                let secret = shared.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
                hub_config.auth.hmac_secret = Some(secret.clone());
                Some(secret)
            }
            // Only engines shared by several nodes keep one, and can fail.
            Err(e) => {
                let shown = redact_user_info(args.engine.as_deref().unwrap_or_default());
                eprintln!(
                    "walkie: {} (the demo tokens' secret)",
                    engine_error(&shown, &e)
                );
                return ExitCode::from(2);
            }
        },
    };
    let verifier = match Verifier::new(&hub_config.auth) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("walkie: --config: {e}");
            return ExitCode::from(2);
        }
    };
    if args.api_key.as_deref() == Some("") {
        eprintln!("walkie: --api-key: must not be empty");
        return ExitCode::from(2);
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| hub_config.auth.api_key.clone());
    // Redis or NATS: several nodes may share it.
    let shared_engine = args.engine.is_some();
    let hub = match presence {
        Some(p) => Hub::with_presence(broker, p),
        None => Hub::new(broker),
    };
    // On a shared engine, an API `disconnect` on any node reaches the
    // connections of every node through the control channel.
    if shared_engine {
        if let Err(e) = main_rt.block_on(hub.listen_control()) {
            let e = redact_user_info(&e.to_string());
            eprintln!("walkie: --engine: cannot subscribe to the control channel: {e}");
            return ExitCode::FAILURE;
        }
    }
    let node = Arc::new(Node {
        hub: hub.clone(),
        config: hub_config,
        verifier,
        queue: QueueLimits {
            messages: args.client_queue as usize,
            bytes: args.client_queue_bytes,
            policy: OverflowPolicy::LatestPerKey,
        },
        ping_interval: args.ping_interval.0,
        publish_rate: args.client_publish_rate.0,
    });
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Inside the runtime: a tokio socket registers with it when it listens.
    let listeners = match main_rt.block_on(async { bind_all(args.bind, workers) }) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!(
                "walkie: --bind {}: cannot listen: {e} (is another walkie running there? give another --bind)",
                args.bind
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("walkie: --bind {}: cannot listen: {e}", args.bind);
            return ExitCode::FAILURE;
        }
    };
    let local = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(args.bind);
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Listen for signals before saying we listen: a SIGTERM sent the
    // moment the address is known must stop us gracefully, not kill us.
    let (signals, reloads) = {
        let _rt = main_rt.enter();
        let reloads = certificate.map(crate::reload::Reloads::register);
        (Signals::register(), reloads.flatten())
    };
    info!(
        "walkie listening on {scheme}://{local}/ (WebSocket chat at /, echo at /echo, rooms at /rooms/NAME, the Walkie protocol at /ws; {workers} worker thread(s))"
    );
    info!("history kept {history_at}");
    // Now that history, the engine and the listeners hold theirs.
    let max_connections = limits::settle(args.max_connections, open_files, workers);
    if demo_secret.is_some() && !local.ip().is_loopback() {
        warn!(
            "development mode on {local} (no --config): every channel is open, and /demo/token signs tokens for any user, to anyone who can reach this address; run with --config anywhere others can connect"
        );
    }

    let tracker = TaskTracker::new();
    let state = Arc::new(AppState {
        config,
        shutdown: CancellationToken::new(),
        // Room for every connection admitted, up to a million (40 MB of
        // address space, touched only as connections come).
        shutdown_wakers: ShutdownWakers::with_capacity(
            max_connections.map_or(0, |n| n.min(1 << 20) as usize),
        ),
        hub,
        node,
        api_key,
        demo_secret,
        rooms: args.room_settings(room_history),
        tracker: tracker.clone(),
        shutdown_timeout: args.shutdown_timeout,
        admission: Admission::new(max_connections),
    });
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (state, tracker, tls) = (state.clone(), tracker.clone(), tls.clone());
        let rt = match runtime(&format!("walkie-{i}")) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("walkie: cannot start worker {i}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let spawned = std::thread::Builder::new()
            .name(format!("walkie-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    if i == 0 && state.hub.broker().delivers_from_own_thread() {
                        // Fan out from a worker, where the subscribers are.
                        state.hub.deliver_here();
                    }
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, &state, &tracker, tls).await,
                        Err(e) => error!("worker {i}: {e}"),
                    }
                    // Connections closing on shutdown run on this thread.
                    tracker.wait().await;
                });
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                eprintln!("walkie: cannot start worker thread {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    let dashboard_on = state.node.config.namespaces.contains_key("dashboard");
    if shared_engine {
        // Entries expire unless refreshed: a dead node's members go away.
        let hub = state.hub.clone();
        let shutdown = state.shutdown.clone();
        main_rt.spawn(async move {
            let mut tick = tokio::time::interval(args.presence_ttl / 3);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => hub.refresh_presence().await,
                }
            }
        });
    }
    if let Some(reloads) = reloads {
        main_rt.spawn(reloads.run(state.shutdown.clone()));
    }
    main_rt.spawn(crate::dashboard::run(
        state.hub.clone(),
        dashboard_on,
        state.shutdown.clone(),
    ));
    main_rt.block_on(async {
        signals.received().await;
        info!(
            "shutting down: closing {} connection(s) with 1001",
            tracker.len()
        );
        state.shut_down();
        tracker.close();
        if tokio::time::timeout(args.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                "{} connection(s) still open after {:?}; exiting anyway",
                tracker.len(),
                args.shutdown_timeout
            );
        }
    });
    info!("bye");
    ExitCode::SUCCESS
}

/// Binds `workers` listening sockets to `addr`. With several, they share
/// the port with `SO_REUSEPORT`, and the kernel spreads new connections
/// over them (one wake per connection, on one worker); a requested port 0
/// becomes the port the first one got.
///
/// `SO_REUSEPORT` would also let a second `walkie serve` of the same user,
/// started there by mistake, take a share of the connections silently: a
/// plain bind of the address first (no `SO_REUSEPORT`) fails if anyone
/// listens there, and is let go before the shared ones are made.
fn bind_all(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpSocket> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Only lets us rebind while old connections linger in TIME_WAIT;
        // on Unix it never shares a port that someone listens on.
        socket.set_reuseaddr(true)?;
        Ok(socket)
    };
    let shared = workers > 1;
    if shared && addr.port() != 0 {
        socket(addr)?.bind(addr)?;
    }
    let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = socket(addr)?;
        #[cfg(unix)]
        if shared {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        socket.listen(4096)?.into_std()
    };
    let first = bind(addr)?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(bind(actual)?);
    }
    Ok(all)
}

/// Accepts connections until shutdown, one task per connection on this
/// thread.
async fn accept_loop(
    listener: TcpListener,
    state: &Arc<AppState>,
    tracker: &TaskTracker,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let state = state.clone();
                    let tls = tls.clone();
                    // A task's future is allocated at its largest state for
                    // the connection's whole life: rarer, larger paths (TLS,
                    // plain HTTP) are boxed so that an idle WebSocket stays
                    // small.
                    tracker.spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        // One deadline from accept to the request head.
                        let deadline = Instant::now() + state.config.handshake_timeout;
                        match tls {
                            None => handle(tcp, peer, state, deadline).await,
                            Some(acceptor) => {
                                Box::pin(handle_tls(tcp, acceptor, peer, state, deadline)).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, registered with the OS when made.
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Registers both; must run inside the runtime that will wait on them.
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let on = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    error!("cannot listen for {name}: {e}");
                    None
                }
            };
            Signals {
                int: on(SignalKind::interrupt(), "Ctrl-C"),
                term: on(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves on the first Ctrl-C or SIGTERM.
    async fn received(mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.int) => info!("Ctrl-C received"),
                () = next(&mut self.term) => info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            match tokio::signal::ctrl_c().await {
                Ok(()) => info!("Ctrl-C received"),
                Err(e) => {
                    error!("cannot listen for Ctrl-C: {e}");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Runs the TLS handshake, then routes the connection. The handshake and
/// the request head share one `deadline` (`--handshake-timeout` after
/// accept), so that a slow handshake does not buy a slow head more time;
/// and shutdown ends the wait at once, as it does in [`handle`]: a client
/// that stalls mid-handshake must not hold the process past
/// `--shutdown-timeout`.
async fn handle_tls(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: SocketAddr,
    state: Arc<AppState>,
    deadline: Instant,
) {
    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
    let stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                debug!(%peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        () = state.shutdown.cancelled() => return,
    };
    handle(stream, peer, state, deadline).await;
}

/// Routes one connection: WebSocket upgrades by path, anything else to the
/// HTTP routes. The request head must arrive by `deadline`.
async fn handle<S>(stream: S, peer: SocketAddr, state: Arc<AppState>, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let left = deadline.saturating_duration_since(Instant::now());
    let incoming = tokio::select! {
        r = Box::pin(Incoming::read(stream, left)) => match r {
            Ok(i) => i,
            Err(e) => {
                debug!(%peer, "no request: {e}");
                return;
            }
        },
        () = state.shutdown.cancelled() => return,
    };
    if !incoming.request().is_websocket_upgrade() {
        Box::pin(http::serve(incoming, peer, state)).await;
        return;
    }
    // Every WebSocket route: a page from another site must not reach any.
    let origins = &state.node.config.auth.allowed_origins;
    if let Some(origin) = incoming.request().origin() {
        if !origins.is_empty() && !origins.iter().any(|o| o == origin) {
            let message = format!("origin {origin} is not allowed");
            info!(%peer, origin, "origin refused");
            incoming.reject(403, &message).await;
            return;
        }
    }
    let path = incoming.request().path().to_owned();
    let route = match path.as_str() {
        "/" => Route::Chat,
        "/echo" => Route::Echo,
        "/ws" => Route::Protocol,
        p if p.starts_with("/rooms/") => Route::Room(&p["/rooms/".len()..]),
        path => {
            let message =
                format!("no WebSocket endpoint at {path} (try /, /echo, /ws or /rooms/NAME)");
            incoming.reject(404, &message).await;
            return;
        }
    };
    let Some(counted) = crate::outbox::Counted::admit(&state) else {
        let max = state.admission.max.unwrap_or_default();
        let message = format!(
            "server full: {max} WebSocket connections open (--max-connections); try again later"
        );
        incoming
            .reject_retry_after(503, &message, limits::RETRY_AFTER)
            .await;
        return;
    };
    match route {
        // Each goes on in a task of its own once open (see `handlers.rs`).
        Route::Chat => handlers::chat(incoming, peer, &state, counted).await,
        Route::Echo => handlers::echo(incoming, peer, &state, counted).await,
        Route::Protocol => Box::pin(ws::endpoint(incoming, peer, &state, counted)).await,
        Route::Room(name) => {
            Box::pin(rooms::room(incoming, name, peer, &state, counted)).await;
        }
    }
}

/// The WebSocket endpoints, by path.
enum Route<'a> {
    /// `/`
    Chat,
    /// `/echo`
    Echo,
    /// `/ws`
    Protocol,
    /// `/rooms/NAME`, with the NAME.
    Room(&'a str),
}

/// How often a NATS node looks for streams of idle channels.
const IDLE_STREAM_CHECK: Duration = Duration::from_secs(600);
/// How long a channel's stream must have been empty to be deleted.
const IDLE_STREAM_AGE: Duration = Duration::from_secs(3600);

/// Deletes, every [`IDLE_STREAM_CHECK`], the NATS streams that have held
/// nothing for [`IDLE_STREAM_AGE`], so that channels used once do not keep
/// a stream forever.
async fn delete_idle_streams(broker: walkie_hub::NatsBroker) {
    let mut tick = tokio::time::interval(IDLE_STREAM_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = broker.delete_idle_streams(IDLE_STREAM_AGE).await {
            tracing::warn!("nats engine: cannot delete idle streams: {e}");
        }
    }
}

/// `--presence-ttl`: a duration of at least a second.
fn parse_presence_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{s}`: at least 1s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_hidden_in_every_url() {
        for (given, shown) in [
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://***@127.0.0.1:6379/0",
            ),
            (
                "nats://u:s3cret@h:4222?replicas=3",
                "nats://***@h:4222?replicas=3",
            ),
            (
                "nats://tok@h1:4222,nats://u:p@h2",
                "nats://***@h1:4222,nats://***@h2",
            ),
            ("redis://:pa,ss@h", "redis://***@h"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "engine unavailable: redis://u:s3cret@h:1: refused (os error 111)",
                "engine unavailable: redis://***@h:1: refused (os error 111)",
            ),
            ("no url here", "no url here"),
        ] {
            assert_eq!(redact_user_info(given), shown, "{given}");
        }
    }
}
