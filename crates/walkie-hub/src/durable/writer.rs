//! The writer thread: batches of publishes saved in one transaction,
//! then delivered.

use super::*;

/// What one request in a batch did, before the commit.
enum Done {
    Published {
        channel: ChannelName,
        /// None for a publish its idempotency key suppressed.
        publication: Option<Publication>,
        result: PublishResult,
        reply: oneshot::Sender<Result<PublishResult, EngineError>>,
    },
    Unit(oneshot::Sender<Result<(), EngineError>>),
}

impl Writer {
    /// Applies batches as they come, and sweeps when a sweep is due: on
    /// time while idle, right after a batch while busy, and step after
    /// step, [`SWEEP_STEP_PAUSE`] apart, while a pass is under way.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut next_sweep = Instant::now() + self.options.interval();
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(first) => self.apply(Self::gather(first, &rx)),
                Err(RecvTimeoutError::Timeout) => {}
                // Everything queued was applied: the broker is gone.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_sweep {
                let pause = if self.sweep() {
                    SWEEP_STEP_PAUSE.min(self.options.interval())
                } else {
                    self.options.interval()
                };
                next_sweep = Instant::now() + pause;
            }
        }
    }

    /// `first` and what else is waiting, up to [`MAX_BATCH`].
    fn gather(first: Request, rx: &mpsc::Receiver<Request>) -> Vec<Request> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        batch
    }

    pub(super) fn apply(&mut self, batch: Vec<Request>) {
        let now = now_ms();
        let started = Instant::now();
        let mut done = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<Vec<ChannelName>, redb::Error> {
            let txn = self.db.begin_write()?;
            let written = {
                let mut meta = txn.open_table(META)?;
                let mut pubs = txn.open_table(PUBS)?;
                let mut keys = txn.open_table(KEYS)?;
                let mut metas: HashMap<ChannelName, Meta> = HashMap::new();
                for request in batch {
                    match request {
                        Request::Publish {
                            channel,
                            new,
                            options,
                            reply,
                        } => {
                            let m = match metas.get_mut(&channel) {
                                Some(m) => m,
                                None => {
                                    let stored = meta
                                        .get(channel.as_str())?
                                        .map(|g| Meta::decode(g.value()));
                                    let m = match stored {
                                        Some(Ok(m)) => m,
                                        Some(Err(e)) => {
                                            let _ = reply.send(Err(e));
                                            continue;
                                        }
                                        // Keep the epoch readers were told.
                                        None => Meta::starting(
                                            lock(&self.usage).unstored_epoch(&channel, started),
                                        ),
                                    };
                                    metas.entry(channel.clone()).or_insert(m)
                                }
                            };
                            if let Some(key) = &options.idempotency_key {
                                // The transaction sees its own writes: a key
                                // used earlier in this batch counts too.
                                let earlier = keys
                                    .get((channel.as_str(), key.as_str()))?
                                    .and_then(|v| seen(v.value(), now));
                                if let Some(position) = earlier {
                                    // Answered with the commit's outcome:
                                    // the key may be this batch's, and
                                    // lost with it if the commit fails.
                                    done.push(Done::Published {
                                        channel,
                                        publication: None,
                                        result: PublishResult {
                                            position,
                                            suppressed: true,
                                        },
                                        reply,
                                    });
                                    continue;
                                }
                            }
                            let (publication, offset) = match options.history {
                                Some(h) => {
                                    m.top += 1;
                                    m.ttl_ms = u64::try_from(h.ttl.as_millis()).unwrap_or(u64::MAX);
                                    let p = new.at(m.top);
                                    pubs.insert((channel.as_str(), m.top), encode(&p).as_slice())?;
                                    trim(&mut pubs, &channel, m, h.size)?;
                                    (p, m.top)
                                }
                                None => (new.at(0), 0),
                            };
                            let result = PublishResult {
                                position: StreamPosition {
                                    offset,
                                    epoch: m.epoch.clone(),
                                },
                                suppressed: false,
                            };
                            if let Some(key) = &options.idempotency_key {
                                let ttl = u64::try_from(options.idempotency_ttl().as_millis())
                                    .unwrap_or(u64::MAX);
                                let mut v = Vec::with_capacity(16 + m.epoch.len());
                                v.extend_from_slice(&offset.to_le_bytes());
                                v.extend_from_slice(&now.saturating_add(ttl).to_le_bytes());
                                v.extend_from_slice(m.epoch.as_bytes());
                                keys.insert((channel.as_str(), key.as_str()), v.as_slice())?;
                            }
                            done.push(Done::Published {
                                channel,
                                publication: Some(publication),
                                result,
                                reply,
                            });
                        }
                        Request::Remove { channel, reply } => {
                            pubs.retain_in(
                                (channel.as_str(), 0)..=(channel.as_str(), u64::MAX),
                                |_, _| false,
                            )?;
                            metas.insert(channel, Meta::fresh());
                            done.push(Done::Unit(reply));
                        }
                    }
                }
                for (channel, m) in &metas {
                    meta.insert(channel.as_str(), m.encode().as_slice())?;
                }
                metas.into_keys().collect()
            };
            txn.commit()?;
            Ok(written)
        })();
        if let Ok(written) = &outcome {
            // After the commit, not before: see `read_or_fresh`.
            let mut usage = lock(&self.usage);
            for channel in written {
                usage.stored(channel, started);
            }
        }
        let outcome = outcome.map(drop);
        let events = self.events.get();
        for d in done {
            match (d, &outcome) {
                (
                    Done::Published {
                        channel,
                        publication,
                        result,
                        reply,
                    },
                    Ok(()),
                ) => {
                    if let (Some(events), Some(p)) = (events, &publication) {
                        events.handle_publication(&channel, p, &result.position.epoch);
                    }
                    let _ = reply.send(Ok(result));
                }
                (Done::Published { reply, .. }, Err(e)) => {
                    let _ = reply.send(Err(storage(e)));
                }
                (Done::Unit(reply), Ok(())) => {
                    let _ = reply.send(Ok(()));
                }
                (Done::Unit(reply), Err(e)) => {
                    let _ = reply.send(Err(storage(e)));
                }
            }
        }
        if let Err(e) = outcome {
            tracing::error!("history: saving a batch failed: {e}");
        }
    }
}

/// An idempotency entry's expiry (Unix ms).
pub(super) fn expiry(v: &[u8]) -> u64 {
    v.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The position an unexpired idempotency entry recorded.
fn seen(v: &[u8], now: u64) -> Option<StreamPosition> {
    if expiry(v) <= now {
        return None;
    }
    let offset = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let epoch = std::str::from_utf8(v.get(16..)?).ok()?;
    Some(StreamPosition {
        offset,
        epoch: epoch.into(),
    })
}

/// Drops what falls out of the history's size and age limits.
fn trim(
    pubs: &mut redb::Table<(&str, u64), &[u8]>,
    channel: &ChannelName,
    meta: &Meta,
    size: usize,
) -> Result<(), redb::Error> {
    let size = size.max(1) as u64;
    let oldest_kept = now_ms().saturating_sub(meta.ttl_ms);
    let first_kept = meta.top.saturating_sub(size) + 1;
    let ch = channel.as_str();
    // Older entries were trimmed by earlier publishes: the range is short.
    pubs.retain_in((ch, 0)..(ch, first_kept), |_, _| false)?;
    let mut expired = Vec::new();
    for entry in pubs.range((ch, 0)..=(ch, meta.top))? {
        let (k, v) = entry?;
        match decode(k.value().1, v.value()) {
            Ok(p) if p.time_ms < oldest_kept => expired.push(k.value().1),
            _ => break,
        }
    }
    for offset in expired {
        pubs.remove((ch, offset))?;
    }
    Ok(())
}
