//! `/rooms/{name}`: rooms by URL, for beginners. Every message a member
//! sends goes to every member of the room (the sender included), unchanged
//! and with no envelope: the seed's client pointed at a room is a group
//! chat. `?history=N` replays the room's last N messages on join.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};
use walkie::{CloseCode, Incoming, Message};
use walkie_hub::{
    ChannelName, Format, HistoryOptions, Kind, NewPublication, PublishOptions, PublishRequest,
    QueueClosed, QueueLimits, Recover,
};

use crate::outbox::{
    BURST_BYTES, Behind, Counted, Sent, Shared, Turns, close_within, read_burst, send_batch,
};
use crate::serve::AppState;

/// The longest room name, in bytes.
const MAX_ROOM_NAME: usize = 64;

/// How rooms behave; set from `walkie serve`'s flags.
#[derive(Debug, Clone, Copy)]
pub struct RoomSettings {
    /// History kept per room: how many messages, for how long (`None`:
    /// none). The `rooms` namespace keeps the same (see `serve.rs`).
    pub history: Option<HistoryOptions>,
    /// Each member's outgoing queue; a member that overflows it is
    /// disconnected with 1013 (try again later) and can rejoin.
    pub queue: QueueLimits,
    /// `--client-publish-rate`: the most messages a member may send per
    /// second of the clock (`None`: no limit). Past it the member's next
    /// messages are read in the next second: nothing is lost, and the
    /// member's TCP connection slows it down.
    pub publish_rate: Option<std::num::NonZeroU32>,
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
            let max = settings.history.map_or(0, |h| h.size);
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
    // Members bring no token: a `rooms` namespace that wants one is kept.
    let config = &state.node.config;
    if let Some(ns) = config
        .namespace(&channel)
        .filter(|ns| ns.private || !ns.anonymous)
    {
        let message = "rooms by URL take no token, and this server's `rooms` namespace is private or closed to anonymous clients: use /ws";
        info!(%peer, room = name, private = ns.private, "room refused");
        incoming.reject(403, message).await;
        return;
    }
    let ws = match Box::pin(incoming.accept(&state.config, None)).await {
        Ok(ws) => Arc::new(Shared::new(ws)),
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
        close_within(&ws, CloseCode::INTERNAL_ERROR, "room unavailable").await;
        return;
    }
    info!(%peer, room = name, "joined room");
    // Set after the join: the history it queued goes first.
    client.queue().set_sink(Some(ws.clone()));
    // A task of its own for the membership: the task that ran the handshake
    // and the routing is sized for them, and a member that sits in a room
    // for hours should not pay for them (3.8 KB per idle member before,
    // about half of it now).
    state
        .tracker
        .spawn(membership(ws, client, channel, counted, peer));
}

/// A member's task: the relay, then the log line. Its future is what an
/// idle member's task holds (a test keeps it within a 512-byte task). A
/// block rather than an `async fn`, which would keep a second copy of its
/// arguments (608 bytes here, 952 as an `async fn`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
fn membership<S>(
    ws: Arc<Shared<S>>,
    mut client: walkie_hub::Client,
    channel: ChannelName,
    counted: Counted,
    peer: SocketAddr,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let why = member(&ws, &mut client, &channel, &counted).await;
        // The room's fan-out lets go of the connection, which closes when
        // this task ends.
        client.queue().set_sink(None);
        let room = channel.as_str().strip_prefix("rooms:").unwrap_or_default();
        info!(%peer, room, "left room: {why}");
    }
}

/// What woke a member's loop.
enum Step {
    Shutdown,
    Popped(Result<(), QueueClosed>),
    Received(Option<walkie::Result<Message>>),
    /// The queue sat out a turn and the socket had nothing.
    Passed,
}

/// Relays between one member and the room until either side ends; returns
/// why it ended.
///
/// The loop is an `async fn`, as large as its largest await and kept in
/// every member's task for its whole life: the select only picks a step,
/// and every await a member rarely reaches (a close, a publish) is boxed
/// and made when reached.
async fn member<S>(
    ws: &Shared<S>,
    client: &mut walkie_hub::Client,
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
    let mut turns = Turns::default();
    loop {
        // Every so often the queue sits out a turn (see `Turns`).
        let queue_turn = !turns.socket_first();
        let step = tokio::select! {
            biased;
            () = poll_fn(|cx| shutdown.poll(cx)) => Step::Shutdown,
            popped = client.queue().pop_all(&mut batch), if queue_turn => Step::Popped(popped),
            next = poll_fn(|cx| ws.lock().poll_recv(cx)) => Step::Received(next),
            () = std::future::ready(()), if !queue_turn => Step::Passed,
        };
        turns.took(matches!(step, Step::Popped(_)));
        let closed = match step {
            Step::Shutdown => {
                close_within(ws, CloseCode::GOING_AWAY, "server shutting down").await;
                return "server shutting down".into();
            }
            Step::Popped(Ok(())) => {
                match send_batch(ws, &mut batch, client.queue(), &mut shutdown).await {
                    // Shutdown: the next turn closes.
                    Ok(()) | Err(Sent::Shutdown) => continue,
                    Err(Sent::Failed(e)) => return format!("send failed: {e}"),
                    Err(Sent::Closed(why)) => why,
                }
            }
            Step::Popped(Err(why)) => why,
            Step::Received(Some(Ok(message))) => {
                let published = publish(ws, state, client, channel, message, &mut shutdown);
                let e = match Box::pin(published).await {
                    // Published; or the member is being closed (shutdown,
                    // its queue closed) while it waited for the next
                    // second: the next turn says why.
                    Ok(None) => continue,
                    Ok(Some(Behind::Failed(e))) => return format!("connection failed: {e}"),
                    // Every message is taken: nothing is refused.
                    Ok(Some(Behind::Closed | Behind::Refused)) => {
                        return "closed by the client".into();
                    }
                    Err(e) => e,
                };
                warn!(room = %channel, "publish failed: {e}");
                let why = format!("publish failed: {e}");
                close_within(
                    ws,
                    CloseCode::INTERNAL_ERROR,
                    "could not publish; try again",
                )
                .await;
                return why;
            }
            Step::Received(Some(Err(e))) => return format!("connection failed: {e}"),
            Step::Received(None) => return "closed by the client".into(),
            Step::Passed => continue,
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
            // Rooms replay the last N, which does not read on later.
            QueueClosed::Unavailable => {
                close_within(ws, CloseCode::INTERNAL_ERROR, "history unavailable").await;
                "history unavailable".into()
            }
        };
    }
}

/// Publishes `first`, a message a member sent to its room, together with
/// the ones it sent right after that are already read or readable, and
/// counts them. One publish for the burst lets the durable engine save it
/// in one commit and reach each member with it in one write, instead of a
/// commit and a write per message, which could not keep up with a busy
/// room (see `docs/performance.md`). Answers how the connection ended if
/// it ended behind the burst, once the burst is published.
///
/// A burst takes no more than the member's publish rate still allows this
/// second; the rest stays unread. A member with none left waits here for
/// the next second (about a second at most, sending what its queue gets
/// meanwhile; shutdown, or its queue closing, ends the wait and drops
/// `first`: the member is being closed), and then the loop takes a turn
/// (pings, the rest of its queue) before anything more is read.
async fn publish<S>(
    ws: &Shared<S>,
    state: &AppState,
    client: &mut walkie_hub::Client,
    channel: &ChannelName,
    first: Message,
    shutdown: &mut crate::shutdown::Waiter<'_>,
) -> Result<Option<Behind>, walkie_hub::EngineError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = state.hub.metrics();
    let rate = state.rooms.publish_rate;
    // No clock to read without a rate: every count is then unlimited.
    let mut now = if rate.is_some() { clock().0 } else { 0 };
    if client.publishes_left(now, rate) == 0 {
        metrics
            .publishes_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Until the clock's second turns (again, if a step back kept it).
        while client.publishes_left(now, rate) == 0 {
            if !wait_for_next_second(ws, client, shutdown).await {
                return Ok(None);
            }
            now = clock().0;
        }
        // The member was sending, not idle, while it waited.
        ws.lock().resume_reading();
    }
    let left = client.publishes_left(now, rate);
    let mut bytes = first.len();
    let mut burst = vec![first];
    let behind = read_burst(ws, bytes, (left, BURST_BYTES), |message| {
        bytes += message.len();
        burst.push(message);
        true
    })
    .await;
    client.take_publishes(now, burst.len(), rate);
    metrics
        .messages_in
        .fetch_add(burst.len() as u64, std::sync::atomic::Ordering::Relaxed);
    metrics
        .bytes_in
        .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    let options = PublishOptions {
        history: state.rooms.history,
        ..PublishOptions::default()
    };
    let requests = burst
        .into_iter()
        .map(|message| PublishRequest {
            channel: channel.clone(),
            publication: match message {
                Message::Text(t) => NewPublication::new(Kind::Text, t.into_bytes()),
                Message::Binary(b) => NewPublication::new(Kind::Binary, b),
            },
            options: options.clone(),
        })
        .collect();
    let results = state.hub.publish_many(requests).await;
    // A failed message stops the member: the ones after it may have been
    // published, as a client's retry after a reconnect could do too.
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(behind), Err)
}

/// Waits for the clock's next second, sending what the member's queue
/// gets meanwhile (as the member's loop would: a busy room must not cut a
/// paced member off as a slow consumer). `false` if the member is being
/// closed instead: shutdown, its queue closed, or a write failed; its
/// loop's next turn says why.
async fn wait_for_next_second<S>(
    ws: &Shared<S>,
    client: &walkie_hub::Client,
    shutdown: &mut crate::shutdown::Waiter<'_>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let next_second = Duration::from_millis(1000 - clock().1);
    let sleep = tokio::time::sleep(next_second);
    tokio::pin!(sleep);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = poll_fn(|cx| shutdown.poll(cx)) => return false,
            popped = client.queue().pop_all(&mut batch) => {
                if popped.is_err() {
                    return false;
                }
                if send_batch(ws, &mut batch, client.queue(), shutdown).await.is_err() {
                    return false;
                }
            }
            () = &mut sleep => return true,
        }
    }
}

/// The clock rates are counted by: whole seconds since the Unix epoch, and
/// the milliseconds into the current one.
fn clock() -> (u64, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs(), u64::from(now.subsec_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{future_size, task_size};

    /// A room member's task: 768 bytes while it held the `WebSocket`,
    /// which is now in `Shared` (see `outbox.rs`), and 896 before the loop
    /// was restructured.
    #[test]
    fn an_idle_member_fits_a_512_byte_task() {
        type Args = (
            Arc<Shared<tokio::net::TcpStream>>,
            walkie_hub::Client,
            ChannelName,
            Counted,
            SocketAddr,
        );
        let size = future_size(|(ws, client, channel, counted, peer): Args| {
            membership(ws, client, channel, counted, peer)
        });
        assert!(
            task_size(size) <= 512,
            "a room member's future is {size} bytes: its task would be {}",
            task_size(size)
        );
    }
}
