//! wss:// end to end: a private CA, a rustls server, and the three client
//! trust settings (custom CA, insecure, default roots).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{text, within};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::net::TcpListener;
use walkie::{ClientConfig, ServerConfig};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("walkie-tls-{name}-{}", std::process::id()));
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
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_echo_server(pki: &Pki) -> u16 {
    let tls =
        walkie::tls::server_config(&pki.dir.join("cert.pem"), &pki.dir.join("key.pem")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = walkie::accept(stream, &ServerConfig::default()).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.recv().await {
                    let _ = ws.feed(m).await;
                }
            });
        }
    });
    port
}

fn client_with(tls: Arc<rustls::ClientConfig>) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.tls = Some(tls);
    config
}

#[tokio::test]
async fn wss_with_a_custom_ca() {
    within(10, async {
        let pki = Pki::new("ca");
        let port = tls_echo_server(&pki).await;
        let config =
            client_with(walkie::tls::client_config_with_ca(&pki.dir.join("ca.pem")).unwrap());
        let (mut ws, _) = walkie::connect_with(&format!("wss://localhost:{port}/"), &config)
            .await
            .unwrap();
        let big = walkie::Message::binary(vec![3u8; 2 << 20]);
        for m in [text("secure hello"), big] {
            ws.send(m.clone()).await.unwrap();
            assert_eq!(ws.recv().await.unwrap().unwrap(), m);
        }
        ws.close(walkie::CloseCode::NORMAL, "").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn wss_insecure_accepts_any_certificate() {
    within(10, async {
        let pki = Pki::new("insecure");
        let port = tls_echo_server(&pki).await;
        let config = client_with(walkie::tls::insecure_client_config().unwrap());
        let (mut ws, _) = walkie::connect_with(&format!("wss://127.0.0.1:{port}/"), &config)
            .await
            .unwrap();
        ws.send("hi").await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), text("hi"));
    })
    .await;
}

#[tokio::test]
async fn wss_with_default_roots_rejects_a_private_ca() {
    within(10, async {
        let pki = Pki::new("roots");
        let port = tls_echo_server(&pki).await;
        let err = walkie::connect(&format!("wss://localhost:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(err, walkie::Error::Tls(_)), "{err}");
    })
    .await;
}

#[test]
fn bad_certificate_files_are_named_in_the_error() {
    let missing = std::path::Path::new("/nonexistent/cert.pem");
    let err = walkie::tls::server_config(missing, missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
}

/// wss:// over a small pipe: a reader that pauses leaves the end of our
/// answer in the server's TLS stream (the socket had no room for its
/// records, though every byte of the message was handed over). Nothing is
/// queued then, but the records must still leave once the pipe drains.
#[tokio::test]
async fn tls_records_left_in_the_stream_go_out_when_the_socket_drains() {
    within(20, async {
        let pki = Pki::new("stall");
        let server_tls =
            walkie::tls::server_config(&pki.dir.join("cert.pem"), &pki.dir.join("key.pem"))
                .unwrap();
        let client_tls = walkie::tls::client_config_with_ca(&pki.dir.join("ca.pem")).unwrap();
        let (a, b) = tokio::io::duplex(16 * 1024);
        tokio::spawn(async move {
            let stream = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(a)
                .await
                .unwrap();
            let mut ws = walkie::accept(stream, &ServerConfig::default())
                .await
                .unwrap();
            while let Some(Ok(m)) = ws.recv().await {
                if ws.feed(m).await.is_err() {
                    return;
                }
            }
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(client_tls)
            .connect(name, b)
            .await
            .unwrap();
        let (mut ws, _) =
            walkie::client::handshake(stream, "localhost", "/", &ClientConfig::default())
                .await
                .unwrap();
        let big = walkie::Message::binary(vec![7u8; 1 << 20]);
        for _ in 0..3 {
            ws.send(big.clone()).await.unwrap();
            // Not reading for a moment: the answer fills the pipe.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(ws.recv().await.unwrap().unwrap(), big);
        }
    })
    .await;
}
