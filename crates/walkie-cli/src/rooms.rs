//! `/rooms/{name}`: rooms by URL, for beginners. Every message a member
//! sends goes to every member of the room (the sender included), unchanged
//! and with no envelope: the seed's client pointed at a room is a group
//! chat. `?history=N` replays the room's last N messages on join.

use std::future::poll_fn;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};
use walkie::{CloseCode, Incoming, Message, WebSocket};
use walkie_hub::{
    ChannelName, Format, HistoryOptions, Kind, NewPublication, PublishOptions, QueueClosed,
    QueueLimits, Recover,
};

use crate::outbox::{Counted, Sent, close_within, send_batch};
use crate::serve::AppState;

/// The longest room name, in bytes.
const MAX_ROOM_NAME: usize = 64;

/// How rooms behave; set from `walkie serve`'s flags.
#[derive(Debug, Clone, Copy)]
pub struct RoomSettings {
    /// History kept per room: how many messages, for how long.
    pub history: HistoryOptions,
    /// Each member's outgoing queue; a member that overflows it is
    /// disconnected with 1013 (try again later) and can rejoin.
    pub queue: QueueLimits,
}

/// Checks a room path's name and query before the upgrade, so that a bad
/// one gets a 400 that says what is wrong.
fn parse(
    name: &str,
    query: Option<&str>,
    settings: &RoomSettings,
) -> Result<(ChannelName, usize), String> {
    if name.is_empty() || name.len() > MAX_ROOM_NAME {
        return Err(format!("a room name has 1 to {MAX_ROOM_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "room name `{name}`: use letters, digits, `-`, `_` and `.` only"
        ));
    }
    let channel = ChannelName::new(&format!("rooms:{name}")).map_err(|e| e.to_string())?;
    let mut history = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "history" {
            let max = settings.history.size;
            history = value
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("history=`{value}`: give a number from 0 to {max}"))?;
        }
    }
    Ok((channel, history))
}

/// Serves one member of a room: the handshake and the join here, then the
/// membership in a task of its own (see `member`).
pub async fn room<S>(
    incoming: Incoming<S>,
    name: &str,
    peer: SocketAddr,
    state: &AppState,
    counted: Counted,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let query = incoming.request().query();
    let (channel, history) = match parse(name, query, &state.rooms) {
        Ok(parsed) => parsed,
        Err(message) => {
            incoming.reject(400, &message).await;
            return;
        }
    };
    let mut ws = match Box::pin(incoming.accept(&state.config, None)).await {
        Ok(ws) => ws,
        Err(e) => {
            debug!(%peer, "upgrade refused: {e}");
            return;
        }
    };
    let mut client = state.hub.client(state.rooms.queue);
    let recover = if history > 0 {
        Recover::Last(history)
    } else {
        Recover::Nothing
    };
    if let Err(e) = Box::pin(client.subscribe(channel.clone(), Format::Raw, recover)).await {
        warn!(%peer, room = name, "cannot join: {e}");
        let _ = ws
            .close(CloseCode::INTERNAL_ERROR, "room unavailable")
            .await;
        return;
    }
    info!(%peer, room = name, "joined room");
    // A task of its own for the membership: the task that ran the handshake
    // and the routing is sized for them, and a member that sits in a room
    // for hours should not pay for them (3.8 KB per idle member before,
    // about half of it now).
    state.tracker.spawn(async move {
        let why = member(&mut ws, &client, &channel, &counted).await;
        let room = channel.as_str().strip_prefix("rooms:").unwrap_or_default();
        info!(%peer, room, "left room: {why}");
    });
}

/// Relays between one member and the room until either side ends; returns
/// why it ended.
async fn member<S>(
    ws: &mut WebSocket<S>,
    client: &walkie_hub::Client,
    channel: &ChannelName,
    state: &AppState,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // 16 bytes where `state.shutdown.cancelled()` holds 72 for the
    // member's whole life.
    let mut shutdown = state.shutdown_wakers.waiter();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = poll_fn(|cx| shutdown.poll(cx)) => {
                let _ = ws.close(CloseCode::GOING_AWAY, "server shutting down").await;
                return "server shutting down".into();
            }
            popped = client.queue().pop_all(&mut batch) => {
                let closed = match popped {
                    Ok(()) => match send_batch(ws, &mut batch, client.queue(), &mut shutdown).await {
                        // Shutdown: the first branch closes.
                        Ok(()) | Err(Sent::Shutdown) => continue,
                        Err(Sent::Failed(e)) => return format!("send failed: {e}"),
                        Err(Sent::Closed(why)) => why,
                    },
                    Err(why) => why,
                };
                return match closed {
                    QueueClosed::SlowConsumer => {
                        crate::outbox::overflowed(state.hub.metrics());
                        close_within(ws, CloseCode::TRY_AGAIN_LATER, "slow consumer: reconnect").await;
                        "too slow: its queue overflowed".into()
                    }
                    QueueClosed::Disconnected => {
                        close_within(ws, CloseCode::NORMAL, "disconnected by the server").await;
                        "disconnected by the server".into()
                    }
                };
            }
            next = ws.recv() => match next {
                Some(Ok(message)) => {
                    let metrics = state.hub.metrics();
                    walkie_hub::Metrics::inc(&metrics.messages_in);
                    metrics.bytes_in.fetch_add(message.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    let publication = match message {
                        Message::Text(t) => NewPublication::new(Kind::Text, t.into_bytes()),
                        Message::Binary(b) => NewPublication::new(Kind::Binary, b),
                    };
                    let options = PublishOptions {
                        history: Some(state.rooms.history),
                        ..PublishOptions::default()
                    };
                    // Boxed: kept inline, the publish's state would be part
                    // of every member's task for its whole life.
                    let published = Box::pin(state.hub.publish(channel.clone(), publication, options));
                    if let Err(e) = published.await {
                        warn!(room = %channel, "publish failed: {e}");
                        let _ = ws.close(CloseCode::INTERNAL_ERROR, "could not publish; try again").await;
                        return format!("publish failed: {e}");
                    }
                }
                Some(Err(e)) => return format!("connection failed: {e}"),
                None => return "closed by the client".into(),
            },
        }
    }
}
