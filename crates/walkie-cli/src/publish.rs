//! `walkie publish CHANNEL DATA`: publishes through a server's HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use walkie::{ClientConfig, WsUrl};

/// Options of `walkie publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The channel, e.g. `news` or `notifications:#42`.
    pub channel: String,

    /// The message: JSON (`'{"title":"hi"}'`, `42`, `'"text"'`), or plain
    /// text with --text.
    pub data: String,

    /// Send DATA as a JSON string instead of parsing it as JSON.
    #[arg(long)]
    pub text: bool,

    /// The server's base URL: http://HOST[:PORT] or https://HOST[:PORT].
    #[arg(long, env = "WALKIE_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,

    /// For https://: trust this PEM CA certificate (instead of the system's
    /// roots).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,

    /// For https://: accept any certificate (local tests only).
    #[arg(short = 'k', long)]
    pub insecure: bool,

    /// The server's API key.
    #[arg(long, env = "WALKIE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// A key that makes a retried publish deliver only once.
    #[arg(long)]
    pub idempotency_key: Option<String>,

    /// The state key, for namespaces whose slow clients skip to the latest
    /// message per key (`overflow = "latest_per_key"`).
    #[arg(long)]
    pub key: Option<String>,

    /// Give up after this long.
    #[arg(long, short = 't', default_value = "10s", value_parser = crate::units::parse_positive_duration)]
    pub timeout: Duration,
}

/// Exit codes: 0 published, 1 the server refused or could not be reached,
/// 2 bad usage.
pub async fn run(args: PublishArgs) -> ExitCode {
    let data: Value = if args.text {
        Value::String(args.data.clone())
    } else {
        match serde_json::from_str(&args.data) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "walkie: DATA is not JSON ({e}); quote a string ('\"hi\"') or pass --text"
                );
                return ExitCode::from(2);
            }
        }
    };
    let server = match server_url(&args.url) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walkie: --url: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = ClientConfig::default();
    config.tls = match crate::connect::tls_client(args.ca.as_deref(), args.insecure) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("walkie: {e}");
            return ExitCode::from(2);
        }
    };
    let mut body = json!({"channel": args.channel, "data": data});
    if let Some(k) = &args.idempotency_key {
        body["idempotency_key"] = json!(k);
    }
    if let Some(k) = &args.key {
        body["key"] = json!(k);
    }
    let call = post(
        &server,
        &config,
        "/api/publish",
        args.api_key.as_deref(),
        body.to_string(),
    );
    match tokio::time::timeout(args.timeout, call).await {
        Err(_) => {
            eprintln!(
                "walkie: no answer from {} within {:?}",
                args.url, args.timeout
            );
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("walkie: {}: {e}", args.url);
            ExitCode::FAILURE
        }
        Ok(Ok((status, text))) if status.is_success() => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Ok(Ok((status, text))) => {
            eprintln!("walkie: the server answered {status}: {}", text.trim_end());
            ExitCode::FAILURE
        }
    }
}

/// Why `--url` cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum UrlError {
    /// Not `http(s)://HOST[:PORT]` with nothing after it but a `/`.
    NotHttp,
    /// `http://HOST:` with nothing after the colon.
    EmptyPort,
    /// Refused by the URL parser (a bad port, user info...).
    Invalid(String),
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlError::NotHttp => f.write_str("give http://HOST:PORT or https://HOST:PORT"),
            UrlError::EmptyPort => {
                f.write_str("the port after the colon is missing (give http://HOST:PORT)")
            }
            UrlError::Invalid(why) => f.write_str(why),
        }
    }
}

/// The server `--url` names: `http(s)://HOST[:PORT]` with nothing after it
/// but a `/`. A URL without a port means the scheme's (80 or 443), as it
/// does for every HTTP client.
fn server_url(url: &str) -> Result<WsUrl, UrlError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or(UrlError::NotHttp)?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(UrlError::NotHttp);
    }
    if authority.ends_with(':') {
        return Err(UrlError::EmptyPort);
    }
    WsUrl::parse(url).map_err(|e| UrlError::Invalid(e.to_string()))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 POST (over TLS for https://); returns the status and
/// body.
async fn post(
    server: &WsUrl,
    config: &ClientConfig,
    path: &str,
    api_key: Option<&str>,
    body: String,
) -> Result<(hyper::StatusCode, String), BoxError> {
    let stream = walkie::open_stream(server, config).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut request = Request::post(path)
        .header(hyper::header::HOST, server.host_header())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = api_key {
        request = request.header(hyper::header::AUTHORIZATION, format!("apikey {key}"));
    }
    let response = sender
        .send_request(request.body(Full::new(bytes::Bytes::from(body)))?)
        .await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn where_(url: &str) -> Result<(bool, String, u16), UrlError> {
        server_url(url).map(|u| (u.tls, u.host, u.port))
    }

    #[test]
    fn the_port_defaults_to_80_or_443() {
        let http = |host: &str, port| Ok((false, host.to_owned(), port));
        assert_eq!(where_("http://localhost"), http("localhost", 80));
        assert_eq!(where_("http://localhost/"), http("localhost", 80));
        assert_eq!(where_("http://[::1]"), http("::1", 80));
        assert_eq!(where_("http://127.0.0.1:3000/"), http("127.0.0.1", 3000));
        assert_eq!(where_("http://[::1]:8080"), http("::1", 8080));
        assert_eq!(where_("http://localhost:"), Err(UrlError::EmptyPort));
        assert_eq!(
            where_("https://localhost"),
            Ok((true, "localhost".into(), 443))
        );
        assert_eq!(
            where_("https://example.org:8443/"),
            Ok((true, "example.org".into(), 8443))
        );
        assert_eq!(where_("http://h/api"), Err(UrlError::NotHttp));
        assert_eq!(where_("http://"), Err(UrlError::NotHttp));
        assert_eq!(where_("ws://h:1"), Err(UrlError::NotHttp));
        assert!(matches!(
            where_("http://h:99999"),
            Err(UrlError::Invalid(_))
        ));
    }
}
