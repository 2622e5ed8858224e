//! The sweep: publications past their TTL, expired idempotency keys and
//! forgotten channels leave the disk, a bounded step at a time.

use super::writer::expiry;
use super::*;

/// How far one table's sweep pass got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Pass<K> {
    /// Not begun.
    #[default]
    Start,
    /// Looked at every row up to and including this key.
    After(K),
    /// Looked at every row.
    Done,
}

impl<K> Pass<K> {
    /// The lower bound of the rows still to look at; `None` once done.
    fn lower(&self) -> Option<Bound<&K>> {
        match self {
            Pass::Start => Some(Bound::Unbounded),
            Pass::After(k) => Some(Bound::Excluded(k)),
            Pass::Done => None,
        }
    }
}

/// The sweep pass under way: one cursor per table it walks.
#[derive(Debug, Default)]
pub(super) struct Sweep {
    /// Channels (the meta table), by name.
    channels: Pass<String>,
    /// Idempotency keys, by channel and key.
    keys: Pass<(String, String)>,
}

impl Sweep {
    fn is_start(&self) -> bool {
        self.channels == Pass::Start && self.keys == Pass::Start
    }

    fn is_done(&self) -> bool {
        self.channels == Pass::Done && self.keys == Pass::Done
    }
}

/// What is left of a channel's history after its expired publications
/// were removed.
enum Left {
    /// Publications still within their TTL (or unreadable ones, which are
    /// left alone).
    Some,
    /// Nothing.
    None,
    /// Not known: the step's budget ran out first.
    Unknown,
}

impl Writer {
    /// Runs one sweep step, beginning a new pass if the last one is done.
    /// Returns whether the pass goes on (the next step should follow
    /// shortly rather than wait for the interval).
    pub(super) fn sweep(&mut self) -> bool {
        let now = Instant::now();
        if self.sweep.is_done() {
            self.sweep = Sweep::default();
        }
        if self.sweep.is_start() {
            lock(&self.usage).forget_idle(now, self.options.forget_after);
        }
        match self.sweep_step(now) {
            Ok(next) => {
                self.sweep = next;
                !self.sweep.is_done()
            }
            Err(e) => {
                // Nothing was removed; the next sweep tries again.
                tracing::error!("history: sweeping failed: {e}");
                false
            }
        }
    }

    /// One sweep step, in its own transaction: at most [`SWEEP_BUDGET`]
    /// idempotency keys, and at most about as many channel rows and
    /// publications. Returns where the pass stands after it.
    fn sweep_step(&self, now: Instant) -> Result<Sweep, redb::Error> {
        let now_ms = now_ms();
        let txn = self.db.begin_write()?;
        let next = {
            let mut meta = txn.open_table(META)?;
            let mut pubs = txn.open_table(PUBS)?;
            let mut keys = txn.open_table(KEYS)?;
            Sweep {
                keys: sweep_keys(&mut keys, &self.sweep.keys, now_ms)?,
                channels: self.sweep_channels(
                    (&mut meta, &mut pubs, &keys),
                    &self.sweep.channels,
                    now_ms,
                    now,
                )?,
            }
        };
        txn.commit()?;
        Ok(next)
    }

    /// Sweeps the channels after `pass`, until the budget runs out: see
    /// [`Writer::sweep_channel`].
    fn sweep_channels(
        &self,
        (meta, pubs, keys): (&mut MetaTable, &mut PubsTable, &KeysTable),
        pass: &Pass<String>,
        now_ms: u64,
        now: Instant,
    ) -> Result<Pass<String>, redb::Error> {
        let Some(lower) = pass.lower() else {
            return Ok(Pass::Done);
        };
        // Rows are copied out first: none can be removed while the table
        // is being read.
        let rows = meta
            .range::<&str>((lower.map(String::as_str), Bound::Unbounded))?
            .take(SWEEP_BUDGET)
            .map(|entry| entry.map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
            .collect::<Result<Vec<_>, _>>()?;
        let complete = rows.len() < SWEEP_BUDGET;
        let mut budget = SWEEP_BUDGET;
        let mut next = pass.clone();
        for (name, row) in rows {
            if budget == 0 {
                return Ok(next);
            }
            if !self.sweep_channel((meta, pubs, keys), &name, &row, now_ms, now, &mut budget)? {
                // Not finished: the next step looks at this channel again.
                return Ok(next);
            }
            next = Pass::After(name);
        }
        Ok(if complete { Pass::Done } else { next })
    }

    /// Removes the expired publications of the channel `name` (its stored
    /// row is `row`), then deletes the row if nothing is left that anyone
    /// needs: no publication, no idempotency key (a live one must go on
    /// answering the epoch it recorded; an expired one goes first, in the
    /// keys' own sweep), and no use for [`DurableOptions::forget_after`].
    /// The next use of the channel then starts a new epoch, as the
    /// contract allows once history is lost. Returns whether the channel
    /// was looked at to the end within `budget`.
    fn sweep_channel(
        &self,
        (meta, pubs, keys): (&mut MetaTable, &mut PubsTable, &KeysTable),
        name: &str,
        row: &[u8],
        now_ms: u64,
        now: Instant,
        budget: &mut usize,
    ) -> Result<bool, redb::Error> {
        *budget = budget.saturating_sub(1);
        let Ok(m) = Meta::decode(row) else {
            tracing::warn!(
                channel = name,
                "history: corrupt stream metadata left alone"
            );
            return Ok(true);
        };
        match expire(pubs, name, m.ttl_ms, now_ms, budget)? {
            Left::Unknown => return Ok(false),
            Left::Some => return Ok(true),
            Left::None => {}
        }
        *budget = budget.saturating_sub(1);
        if has_keys(keys, name)? {
            return Ok(true);
        }
        let unneeded =
            lock(&self.usage).unneeded(name, now, self.opened, self.options.forget_after);
        if unneeded {
            meta.remove(name)?;
        }
        Ok(true)
    }
}

type MetaTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type PubsTable<'t> = redb::Table<'t, (&'static str, u64), &'static [u8]>;
type KeysTable<'t> = redb::Table<'t, (&'static str, &'static str), &'static [u8]>;

/// Removes the expired idempotency keys among at most [`SWEEP_BUDGET`]
/// after `pass`. Keys are not in expiry order (a channel's keys are sorted
/// by key), so every key is looked at once per pass.
pub(super) fn sweep_keys(
    keys: &mut KeysTable,
    pass: &Pass<(String, String)>,
    now_ms: u64,
) -> Result<Pass<(String, String)>, redb::Error> {
    let Some(lower) = pass.lower() else {
        return Ok(Pass::Done);
    };
    let lower = lower.map(|(c, k)| (c.as_str(), k.as_str()));
    let mut expired = Vec::new();
    let mut last = None;
    let mut seen = 0;
    for entry in keys.range::<(&str, &str)>((lower, Bound::Unbounded))? {
        if seen == SWEEP_BUDGET {
            break;
        }
        seen += 1;
        let (k, v) = entry?;
        let (channel, key) = k.value();
        let name = (channel.to_owned(), key.to_owned());
        if expiry(v.value()) <= now_ms {
            expired.push(name.clone());
        }
        last = Some(name);
    }
    for (channel, key) in &expired {
        keys.remove((channel.as_str(), key.as_str()))?;
    }
    Ok(match last {
        Some(last) if seen == SWEEP_BUDGET => Pass::After(last),
        _ => Pass::Done,
    })
}

/// Removes the channel's publications older than `ttl_ms`, oldest first,
/// looking at most at `budget` of them (and counting them off it).
fn expire(
    pubs: &mut PubsTable,
    channel: &str,
    ttl_ms: u64,
    now_ms: u64,
    budget: &mut usize,
) -> Result<Left, redb::Error> {
    let oldest_kept = now_ms.saturating_sub(ttl_ms);
    let mut left = Left::None;
    let mut expired_to = None;
    for entry in pubs.range((channel, 0)..=(channel, u64::MAX))? {
        if *budget == 0 {
            left = Left::Unknown;
            break;
        }
        *budget -= 1;
        let (k, v) = entry?;
        match publication_time(v.value()) {
            Some(t) if t < oldest_kept => expired_to = Some(k.value().1),
            // Offsets follow publish time: the rest is newer.
            _ => {
                left = Left::Some;
                break;
            }
        }
    }
    if let Some(last) = expired_to {
        pubs.retain_in((channel, 0)..=(channel, last), |_, _| false)?;
    }
    Ok(left)
}

/// Whether the channel has any idempotency key, live or not.
fn has_keys(keys: &KeysTable, channel: &str) -> Result<bool, redb::Error> {
    match keys.range((channel, "")..)?.next() {
        Some(entry) => Ok(entry?.0.value().0 == channel),
        None => Ok(false),
    }
}

/// A stored publication's time (Unix ms), read without copying its payload;
/// `None` if the bytes are too short. The layout is `codec::encode`'s: a
/// flags byte, then the time (u64 LE).
fn publication_time(v: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(v.get(1..9)?.try_into().ok()?))
}
