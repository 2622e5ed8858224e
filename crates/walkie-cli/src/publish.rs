//! `walkie publish CHANNEL DATA`: publishes through a server's HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

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
    let server = match server_authority(&args.url) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walkie: --url: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match (server.tls, &args.ca, args.insecure) {
        (false, _, _) => Ok(None),
        (true, Some(ca), _) => walkie::tls::client_config_with_ca(ca)
            .map(Some)
            .map_err(|e| format!("--ca: {e}")),
        (true, None, true) => walkie::tls::insecure_client_config()
            .map(Some)
            .map_err(|e| e.to_string()),
        (true, None, false) => walkie::tls::default_client_config()
            .map(Some)
            .map_err(|e| e.to_string()),
    };
    let tls = match tls {
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
        tls,
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
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UrlError::NotHttp => "give http://HOST:PORT or https://HOST:PORT",
            UrlError::EmptyPort => "the port after the colon is missing (give http://HOST:PORT)",
        })
    }
}

/// Where `--url` points.
#[derive(Debug, PartialEq, Eq)]
struct Server {
    /// `https://`.
    tls: bool,
    /// `HOST:PORT`, to connect to and for the `Host` header.
    authority: String,
    /// `HOST`, without an IPv6 literal's brackets: the name the
    /// certificate must hold.
    host: String,
}

/// The server `--url` names; a URL without a port means port 80 (443 for
/// https), as it does for every HTTP client (a bare `HOST` is not a
/// socket address).
fn server_authority(url: &str) -> Result<Server, UrlError> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(UrlError::NotHttp),
    };
    let authority = Some(rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or(UrlError::NotHttp)?;
    if authority.ends_with(':') {
        return Err(UrlError::EmptyPort);
    }
    // The last colon starts the port unless it is inside an IPv6 literal
    // (`[::1]`).
    let port = authority
        .rsplit_once(':')
        .filter(|(_, port)| !port.contains(']'));
    let host = port.map_or(authority, |(host, _)| host);
    let authority = match port {
        Some(_) => authority.to_owned(),
        None => format!("{authority}:{}", if tls { 443 } else { 80 }),
    };
    Ok(Server {
        tls,
        authority,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 POST, over TLS with `tls`; returns the status and body.
async fn post(
    server: &Server,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    path: &str,
    api_key: Option<&str>,
    body: String,
) -> Result<(hyper::StatusCode, String), BoxError> {
    let tcp = tokio::net::TcpStream::connect(&server.authority).await?;
    let Some(tls) = tls else {
        return exchange(tcp, &server.authority, path, api_key, body).await;
    };
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(server.host.clone())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    exchange(stream, &server.authority, path, api_key, body).await
}

async fn exchange<S>(
    io: S,
    authority: &str,
    path: &str,
    api_key: Option<&str>,
    body: String,
) -> Result<(hyper::StatusCode, String), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    let mut request = Request::post(path)
        .header(hyper::header::HOST, authority)
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

    fn authority(url: &str) -> Result<(bool, String, String), UrlError> {
        server_authority(url).map(|s| (s.tls, s.authority, s.host))
    }

    fn http(authority: &str, host: &str) -> Result<(bool, String, String), UrlError> {
        Ok((false, authority.into(), host.into()))
    }

    #[test]
    fn the_port_defaults_to_80_or_443() {
        assert_eq!(
            authority("http://localhost"),
            http("localhost:80", "localhost")
        );
        assert_eq!(
            authority("http://localhost/"),
            http("localhost:80", "localhost")
        );
        assert_eq!(authority("http://[::1]"), http("[::1]:80", "::1"));
        assert_eq!(
            authority("http://127.0.0.1:3000/"),
            http("127.0.0.1:3000", "127.0.0.1")
        );
        assert_eq!(authority("http://[::1]:8080"), http("[::1]:8080", "::1"));
        assert_eq!(authority("http://localhost:"), Err(UrlError::EmptyPort));
        assert_eq!(
            authority("https://localhost"),
            Ok((true, "localhost:443".into(), "localhost".into()))
        );
        assert_eq!(
            authority("https://example.org:8443/"),
            Ok((true, "example.org:8443".into(), "example.org".into()))
        );
        assert_eq!(authority("http://h/api"), Err(UrlError::NotHttp));
        assert_eq!(authority("http://"), Err(UrlError::NotHttp));
        assert_eq!(authority("ws://h:1"), Err(UrlError::NotHttp));
    }
}
