#![allow(dead_code)]

//! A Walkie protocol client for tests, written from docs/protocol.md:
//! commands with ids, replies matched by id, pushes kept in order.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};
use walkie::{ClientConfig, MaybeTlsStream, Message, WebSocket};

pub struct Proto {
    pub ws: WebSocket<MaybeTlsStream>,
    next_id: u64,
    pub pushes: VecDeque<Value>,
}

/// Opens `/ws` offering `walkie.v1`.
pub async fn open(port: u16) -> Proto {
    let mut config = ClientConfig::default();
    config.protocols = vec!["walkie.v1".into()];
    let (ws, _) = walkie::connect_with(&format!("ws://127.0.0.1:{port}/ws"), &config)
        .await
        .expect("cannot open /ws");
    assert_eq!(ws.protocol(), Some("walkie.v1"));
    Proto {
        ws,
        next_id: 1,
        pushes: VecDeque::new(),
    }
}

/// Opens `/ws` and connects (with `token`, if any); returns the result.
pub async fn connected(port: u16, token: Option<&str>) -> (Proto, Value) {
    let mut p = open(port).await;
    let params = match token {
        Some(t) => json!({ "token": t }),
        None => json!({}),
    };
    let r = p.call("connect", params).await;
    assert!(r.get("result").is_some(), "connect failed: {r}");
    let result = r["result"].clone();
    (p, result)
}

impl Proto {
    /// The next message from the server, as JSON; `None` if the connection
    /// ended (see `close_code`).
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(5)).await
    }

    /// [`Proto::next`], waiting up to `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let m = tokio::time::timeout(wait, self.ws.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing from the server within {wait:?}"))?;
        match m {
            Ok(Message::Text(t)) => Some(serde_json::from_str(&t).expect("not JSON")),
            Ok(other) => panic!("not a text message: {other:?}"),
            Err(_) => None,
        }
    }

    /// Sends a command and waits for its reply (the whole reply object);
    /// pushes that arrive first are kept in `pushes`.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = serde_json::Map::new();
        command.insert("id".into(), id.into());
        command.insert(method.into(), params);
        self.ws
            .send(Value::Object(command).to_string())
            .await
            .expect("send failed");
        loop {
            let m = self.next().await.unwrap_or_else(|| {
                panic!(
                    "connection ended before the reply to {method}: close {:?}",
                    self.close_code()
                )
            });
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                return m;
            }
            assert!(m.get("id").is_none(), "a reply to another command: {m}");
            self.pushes.push_back(m);
        }
    }

    /// `call`, asserting success; returns the result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params).await;
        assert!(r.get("result").is_some(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// `call`, asserting an error; returns its code.
    pub async fn error_code(&mut self, method: &str, params: Value) -> u64 {
        let r = self.call(method, params).await;
        r["error"]["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("{method}: expected an error, got {r}"))
    }

    /// The next push (kept or new).
    pub async fn push(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        let m = self.next().await.expect("connection ended");
        assert!(m.get("id").is_none(), "expected a push, got a reply: {m}");
        m
    }

    /// The next `pub` push, skipping joins and leaves.
    pub async fn publication(&mut self) -> Value {
        loop {
            let p = self.push().await;
            if let Some(publication) = p.get("pub") {
                return publication.clone();
            }
        }
    }

    /// Sends raw text (not necessarily a command).
    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(text).await.expect("send failed");
    }

    /// Reads until the connection ends; returns the server's close code.
    pub async fn closed(&mut self) -> Option<u16> {
        while self.next().await.is_some() {}
        self.close_code()
    }

    pub fn close_code(&self) -> Option<u16> {
        self.ws.close_frame().map(|f| f.code.0)
    }
}

/// An HS256 token signed with `secret` for `claims`.
pub fn token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
