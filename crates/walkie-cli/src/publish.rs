//! `walkie publish CHANNEL DATA`: publishes through a server's HTTP API.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

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

    /// The server's base URL (http:// only).
    #[arg(long, env = "WALKIE_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,

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
    let authority = match server_authority(&args.url) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walkie: --url: {e}");
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
        &authority,
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
    /// Not `http://HOST[:PORT]` with nothing after it but a `/`.
    NotHttp,
    /// `http://HOST:` with nothing after the colon.
    EmptyPort,
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UrlError::NotHttp => "give http://HOST:PORT (https is not supported by this command)",
            UrlError::EmptyPort => "the port after the colon is missing (give http://HOST:PORT)",
        })
    }
}

/// `HOST:PORT` to connect to from `--url`; a URL without a port means
/// port 80, as it does for every HTTP client (a bare `HOST` is not a
/// socket address).
fn server_authority(url: &str) -> Result<String, UrlError> {
    let authority = url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or(UrlError::NotHttp)?;
    if authority.ends_with(':') {
        return Err(UrlError::EmptyPort);
    }
    // The last colon starts the port unless it is inside an IPv6 literal
    // (`[::1]`).
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']'));
    Ok(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

/// One HTTP/1.1 POST; returns the status and body.
async fn post(
    authority: &str,
    path: &str,
    api_key: Option<&str>,
    body: String,
) -> Result<(hyper::StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
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

    #[test]
    fn the_port_defaults_to_80() {
        assert_eq!(
            server_authority("http://localhost"),
            Ok("localhost:80".into())
        );
        assert_eq!(
            server_authority("http://localhost/"),
            Ok("localhost:80".into())
        );
        assert_eq!(server_authority("http://[::1]"), Ok("[::1]:80".into()));
        assert_eq!(
            server_authority("http://127.0.0.1:3000/"),
            Ok("127.0.0.1:3000".into())
        );
        assert_eq!(
            server_authority("http://[::1]:8080"),
            Ok("[::1]:8080".into())
        );
        assert_eq!(
            server_authority("http://localhost:"),
            Err(UrlError::EmptyPort)
        );
        assert_eq!(
            server_authority("https://localhost"),
            Err(UrlError::NotHttp)
        );
        assert_eq!(server_authority("http://h/api"), Err(UrlError::NotHttp));
        assert_eq!(server_authority("http://"), Err(UrlError::NotHttp));
    }
}
