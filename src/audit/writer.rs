//! The writer: a bounded queue, group commit, rotation, continuation after restart.
//!
//! # Who writes a record
//!
//! The writer's state (file, chain position, reserve) sits behind one lock. A thread of its own
//! (`audit-writer`) drains the bounded queue, writing each group with one `write(2)`, and does
//! everything that may wait on the disk: `fsync = "always"`'s `fdatasync`, rotation, the reserve's
//! top-ups, writing to a device or a pipe, and the retry after a failed write. With `fsync =
//! "batch"` or `"never"` the common case needs none of that: when nothing is queued and the lock
//! is free, the request's own thread encodes, chains and appends its record to the regular file
//! ([`AuditLog::write_reserved`]), which spares the two thread switches of a hand-off (a fifth of
//! the gateway's CPU with one request at a time). Anything else, and whatever comes while the lock
//! is held, goes through the queue. An append that takes longer than [`INLINE_STALL`] (the page
//! cache throttled by writeback, say) sends every record through the queue for [`INLINE_PAUSE`],
//! so a slow disk holds up a request thread at most once per pause (for as long as that one
//! append takes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::chain::{self, ChainKey, GENESIS_PREV_HASH};
use super::files::{self, rotated_file_name, rotated_siblings};
use super::record::{MAX_RECORD_BYTES, format_ts};
use super::{AuditError, AuditRecord, AuditSettings, Fsync, OnError};

type Ack = oneshot::Sender<Result<(), AuditError>>;

/// A record handed back for the queue, with its reservation.
type ForQueue = (Box<AuditRecord>, AuditReservation);

enum Msg {
    Record(Box<AuditRecord>, Ack, AuditReservation),
    /// A record written on a request thread brought the writer thread's next timed work nearer
    /// (the batch sync of what it wrote): the thread recomputes its timer.
    Wake,
    Shutdown(oneshot::Sender<()>),
}

/// What the writer and the handles share.
struct Shared {
    failed: AtomicBool,
    closed: AtomicBool,
    pending: AtomicUsize,
    capacity: usize,
    written: AtomicU64,
    errors: AtomicU64,
    /// Reservations taken and not yet written (or given up).
    outstanding: AtomicUsize,
    /// Bytes allocated beyond the end of the current file; `u64::MAX` without a reserve.
    spare: AtomicU64,
}

/// Room for one record in the disk reserve and a place in the queue, taken before a request is
/// forwarded (see "Disk reserve" in the module documentation). Given back when dropped, or when
/// the record it was handed with has been written.
pub struct AuditReservation {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditReservation")
    }
}

impl Drop for AuditReservation {
    fn drop(&mut self) {
        self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    /// Shared with the writer thread; see "Who writes a record".
    writer: Arc<Mutex<Writer>>,
    on_error: OnError,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The audit log of a running gateway. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .field("records_written", &self.records_written())
            .field("errors", &self.errors())
            .finish()
    }
}

/// The most records committed by one `write(2)`.
const MAX_GROUP: usize = 1024;

/// What a line adds to the canonical JSON: `,"hash":"<64 hex>"` and `\n`.
const LINE_OVERHEAD: usize = 80;

/// A record appended on a request thread that took longer than this (see "Who writes a record")...
pub const INLINE_STALL: Duration = Duration::from_millis(5);

/// ...sends every record through the writer thread for this long.
pub const INLINE_PAUSE: Duration = Duration::from_secs(1);

impl AuditLog {
    /// Opens the log (creating folders), continues the chain of the newest file (a torn last
    /// line is moved aside to `<file>.torn-<unix ms>` and logged), and starts the writer thread.
    ///
    /// Fails when the file cannot be created or opened, when the last complete line of the
    /// newest file is not a record (the chain cannot be continued: look at it with
    /// `audit verify`), or when the settings are unusable.
    pub fn open(settings: AuditSettings) -> Result<AuditLog, AuditError> {
        if settings.queue_capacity == 0 {
            return Err(AuditError::Settings(
                "queue_capacity must be at least 1".into(),
            ));
        }
        if settings.reserve_bytes < MAX_RECORD_BYTES as u64 {
            return Err(AuditError::Settings(format!(
                "reserve_bytes must be at least {MAX_RECORD_BYTES} (one record)"
            )));
        }
        let key = ChainKey::new(settings.hmac_key.as_ref())?;
        let base = settings.path.clone();
        if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| AuditError::io(parent, e))?;
        }
        let (next_seq, prev_hash) = match recover_chain(&base, &key)? {
            Some(last) => (last.seq.saturating_add(1), last.hash),
            None => (1, GENESIS_PREV_HASH.to_string()),
        };
        let base_first_seq = first_seq_of(&base)?;
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            capacity: settings.queue_capacity,
            written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            spare: AtomicU64::new(0),
        });
        let mut writer = Writer {
            base,
            file: None,
            regular: true,
            file_len: 0,
            file_first_seq: base_first_seq,
            next_seq,
            prev_hash: prev_hash.clone(),
            committed: (next_seq, prev_hash),
            needs_truncate: false,
            key,
            fsync: settings.fsync,
            rotate_bytes: settings.rotate_bytes,
            batch_interval: settings.batch_interval,
            last_sync: Instant::now(),
            dirty: false,
            buf: Vec::with_capacity(64 * 1024),
            canon: Vec::with_capacity(4096),
            shared: shared.clone(),
            reserve_bytes: settings.reserve_bytes,
            reserve_supported: true,
            allocated_end: 0,
            reserve_short: false,
            next_topup: Instant::now(),
            next_file: None,
            rotation_deferred: false,
            syncer: None,
            stopped: false,
            inline_paused_until: None,
        };
        if settings.fsync == Fsync::Batch {
            // Without the thread, the writer syncs itself, as in the other modes.
            writer.syncer = Syncer::start(shared.clone(), writer.base.clone()).ok();
        }
        writer
            .open_current()
            .map_err(|e| AuditError::io(&writer.base, e))?;
        let (tx, rx) = mpsc::sync_channel(settings.queue_capacity);
        let writer = Arc::new(Mutex::new(writer));
        let (for_thread, shared_for_thread) = (writer.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                batch_scheduling();
                run(&for_thread, &shared_for_thread, rx)
            })
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                shared,
                writer,
                on_error: settings.on_error,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues the record and resolves when it is durable per the fsync mode: with
    /// [`Fsync::Always`] after the fsync of the group that contains it, otherwise after its
    /// `write(2)`. Fails at once when the queue is full or the log is shut down, and when the
    /// group could not be written. Dropping the future does not withdraw the record.
    ///
    /// With [`Fsync::Always`] a failed fsync fails the waiters of records that did reach the
    /// file (the chain goes on from them): such a record may still be found in the log.
    ///
    /// Takes its room in the disk reserve first ([`AuditLog::reserve`]): fails with
    /// [`AuditError::NoSpace`] when the reserve cannot hold it.
    pub async fn write(&self, rec: AuditRecord) -> Result<(), AuditError> {
        let reservation = self.reserve().inspect_err(|_| {
            self.inner.shared.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        self.write_reserved(rec, reservation).await
    }

    /// Room for one record: a place in the queue and [`MAX_RECORD_BYTES`] of the disk reserve,
    /// so the record written later with [`AuditLog::write_reserved`] cannot fail for want of
    /// space. Fails with [`AuditError::QueueFull`] when the queue's capacity is taken by records
    /// not yet written, [`AuditError::NoSpace`] when the reserve cannot hold one more record,
    /// [`AuditError::Closed`] after shutdown.
    pub fn reserve(&self) -> Result<AuditReservation, AuditError> {
        let s = &self.inner.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        let unit = MAX_RECORD_BYTES as u64;
        let mut n = s.outstanding.load(Ordering::Acquire);
        loop {
            if n >= s.capacity {
                return Err(AuditError::QueueFull(s.capacity));
            }
            // The writer lowers `spare` before it gives back the reservations of what it wrote,
            // so this can only undercount the room left.
            if (n as u64 + 1).saturating_mul(unit) > s.spare.load(Ordering::Acquire) {
                return Err(AuditError::NoSpace);
            }
            match s
                .outstanding
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        Ok(AuditReservation { shared: s.clone() })
    }

    /// [`AuditLog::write`] with room taken earlier by [`AuditLog::reserve`]. Written on the
    /// calling thread when it can be, otherwise queued (see "Who writes a record").
    pub async fn write_reserved(
        &self,
        rec: AuditRecord,
        reservation: AuditReservation,
    ) -> Result<(), AuditError> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        let (rec, reservation) = match self.write_here(Box::new(rec), reservation) {
            Ok(written) => return written,
            Err(queue) => queue,
        };
        let (ack, done) = oneshot::channel();
        shared.pending.fetch_add(1, Ordering::AcqRel);
        match self.inner.tx.try_send(Msg::Record(rec, ack, reservation)) {
            Ok(()) => {}
            Err(e) => {
                shared.pending.fetch_sub(1, Ordering::AcqRel);
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return Err(match e {
                    TrySendError::Full(_) => AuditError::QueueFull(shared.capacity),
                    TrySendError::Disconnected(_) => AuditError::Closed,
                });
            }
        }
        done.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Writes the record on this thread when nothing is queued, the writer is free and the write
    /// cannot wait on the disk ([`Writer::can_write_here`]); otherwise hands it back for the
    /// queue.
    fn write_here(
        &self,
        rec: Box<AuditRecord>,
        reservation: AuditReservation,
    ) -> Result<Result<(), AuditError>, ForQueue> {
        let inner = &self.inner;
        if inner.shared.pending.load(Ordering::Acquire) > 0 {
            return Err((rec, reservation));
        }
        let mut writer = match inner.writer.try_lock() {
            Ok(w) => w,
            Err(TryLockError::WouldBlock) => return Err((rec, reservation)),
            Err(TryLockError::Poisoned(_)) => {
                close_after_panic(&inner.shared);
                inner.shared.errors.fetch_add(1, Ordering::Relaxed);
                return Ok(Err(AuditError::Closed));
            }
        };
        let started = Instant::now();
        if !writer.can_write_here(started) {
            return Err((rec, reservation));
        }
        let deadline = writer.next_deadline();
        let (ack, mut done) = oneshot::channel();
        writer.commit_group(vec![Pending {
            rec,
            ack,
            reservation,
        }]);
        writer.note_append_time(started.elapsed(), Instant::now());
        // The writer thread sleeps until the deadline it saw (the batch sync, a top-up retry):
        // told when this write brought an earlier one. A full queue wakes it anyway.
        let wake = writer
            .next_deadline()
            .is_some_and(|due| deadline.is_none_or(|seen| due < seen));
        drop(writer);
        if wake {
            let _ = inner.tx.try_send(Msg::Wake);
        }
        // `commit_group` answers every record it is given before it returns.
        Ok(done.try_recv().unwrap_or(Err(AuditError::Closed)))
    }

    /// False after a write error until a write succeeds again, while the queue is full, while
    /// the disk reserve cannot hold one more record, and after shutdown.
    pub fn healthy(&self) -> bool {
        let s = &self.inner.shared;
        !s.failed.load(Ordering::Acquire)
            && !s.closed.load(Ordering::Acquire)
            && s.pending.load(Ordering::Acquire) < s.capacity
            && s.outstanding.load(Ordering::Acquire) < s.capacity
            && s.spare.load(Ordering::Acquire) >= MAX_RECORD_BYTES as u64
    }

    pub fn on_error(&self) -> OnError {
        self.inner.on_error
    }

    /// Records written (acknowledged as durable per the fsync mode).
    pub fn records_written(&self) -> u64 {
        self.inner.shared.written.load(Ordering::Relaxed)
    }

    /// Records waiting in the writer's queue, not yet taken into a group to write
    /// (`gateway_audit_queue_depth`); at `audit.queue_capacity` new records are refused.
    pub fn queue_depth(&self) -> u64 {
        self.inner.shared.pending.load(Ordering::Acquire) as u64
    }

    /// Records refused (queue full) or not written (I/O error), plus failed periodic fsyncs.
    pub fn errors(&self) -> u64 {
        self.inner.shared.errors.load(Ordering::Relaxed)
    }

    /// Writes and fsyncs everything queued, then stops the writer. Later writes fail with
    /// [`AuditError::Closed`]. Waits (blocking this thread) for a queue slot when the queue is
    /// full.
    pub async fn shutdown(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        // Every caller waits for the flush; once the writer has stopped, the send fails or the
        // answer is dropped, and that is the answer.
        let (ack, done) = oneshot::channel();
        if self.inner.tx.send(Msg::Shutdown(ack)).is_ok() {
            let _ = done.await;
        }
        let handle = self
            .inner
            .thread
            .lock()
            .ok()
            .and_then(|mut guard| guard.take());
        if let Some(handle) = handle {
            // The writer has answered and only returns from `run` now.
            let _ = handle.join();
        }
    }
}

/// The last record of the newest non-empty file of the chain at `base`, after repairing a torn
/// tail there.
fn recover_chain(base: &Path, key: &ChainKey) -> Result<Option<AuditRecord>, AuditError> {
    let mut files: Vec<PathBuf> = rotated_siblings(base)
        .map_err(|e| AuditError::io(base, e))?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(base.to_path_buf());
    for path in files.iter().rev() {
        if let Some(last) = recover_file(path, key)? {
            return Ok(Some(last));
        }
    }
    Ok(None)
}

fn recover_file(path: &Path, key: &ChainKey) -> Result<Option<AuditRecord>, AuditError> {
    let io_err = |e: io::Error| AuditError::io(path, e);
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let len = meta.len();
    // Read-only unless a repair is needed: older files may have been made read-only.
    let mut f = File::open(path).map_err(io_err)?;
    let tail = files::scan_tail(&mut f, len).map_err(io_err)?;
    let mut last =
        match &tail.last_line {
            Some(line) => Some(serde_json::from_slice::<AuditRecord>(line).map_err(|e| {
                AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: 0,
                    message: format!(
                        "the last complete line is not an audit record ({e}); run `audit verify`"
                    ),
                }
            })?),
            None => None,
        };
    if let Some(last) = &last {
        let mut check = last.clone();
        let mut canon = Vec::new();
        if chain::canonical_into(&mut check, &mut canon).is_err()
            || key.digest(&check.prev_hash, &canon) != check.hash
        {
            tracing::warn!(
                file = %path.display(),
                seq = last.seq,
                "the last audit record does not verify with the configured key; continuing its chain"
            );
        }
    }
    if let Some(torn_at) = tail.torn_at {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let mut torn = Vec::new();
        f.seek(SeekFrom::Start(torn_at)).map_err(io_err)?;
        Read::by_ref(&mut f)
            .read_to_end(&mut torn)
            .map_err(io_err)?;
        if let Some(rec) = complete_record(&torn, last.as_ref(), key) {
            f.seek(SeekFrom::End(0)).map_err(io_err)?;
            f.write_all(b"\n").map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            tracing::warn!(
                file = %path.display(),
                seq = rec.seq,
                "the last audit record had lost its newline; terminated it"
            );
            last = Some(rec);
        } else {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let millis = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
            let aside = path.with_file_name(format!("{name}.torn-{millis}"));
            fs::write(&aside, &torn).map_err(|e| AuditError::io(&aside, e))?;
            f.set_len(torn_at).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            tracing::warn!(
                file = %path.display(),
                bytes = torn.len(),
                moved_to = %aside.display(),
                "torn last audit line (an interrupted write) moved aside; the chain continues from the last complete record"
            );
        }
    }
    Ok(last)
}

/// `bytes` as a record that is canonical, correctly hashed and follows `prev`.
fn complete_record(
    bytes: &[u8],
    prev: Option<&AuditRecord>,
    key: &ChainKey,
) -> Option<AuditRecord> {
    let mut rec: AuditRecord = serde_json::from_slice(bytes).ok()?;
    let mut canon = Vec::new();
    chain::canonical_into(&mut rec, &mut canon).ok()?;
    let mut line = Vec::new();
    chain::push_line(&canon, &rec.hash, &mut line);
    let follows = match prev {
        Some(p) => rec.seq == p.seq.saturating_add(1) && rec.prev_hash == p.hash,
        None => true,
    };
    (line == bytes && follows && key.digest(&rec.prev_hash, &canon) == rec.hash).then_some(rec)
}

/// The seq of the first record of the current file, when it has one.
fn first_seq_of(path: &Path) -> Result<Option<u64>, AuditError> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => {}
        _ => return Ok(None),
    }
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    let line = files::first_line(path).map_err(|e| AuditError::io(path, e))?;
    match line.map(|l| serde_json::from_slice::<SeqOnly>(&l)) {
        Some(Ok(s)) => Ok(Some(s.seq)),
        Some(Err(e)) => Err(AuditError::Corrupt {
            path: path.to_path_buf(),
            line: 1,
            message: format!("not an audit record ({e})"),
        }),
        None => Ok(None),
    }
}

struct Writer {
    base: PathBuf,
    file: Option<File>,
    /// False for devices and pipes: no rotation, no truncation.
    regular: bool,
    /// Bytes known to be good in the current file.
    file_len: u64,
    file_first_seq: Option<u64>,
    next_seq: u64,
    prev_hash: String,
    /// The chain position after the last record that reached the file.
    committed: (u64, String),
    /// A failed write may have left part of a line: cut back to `file_len` before writing.
    needs_truncate: bool,
    key: ChainKey,
    fsync: Fsync,
    rotate_bytes: u64,
    batch_interval: Duration,
    last_sync: Instant,
    /// Written but not yet fsynced.
    dirty: bool,
    buf: Vec<u8>,
    canon: Vec<u8>,
    shared: Arc<Shared>,
    reserve_bytes: u64,
    /// False for devices and pipes, and where the filesystem has no `fallocate`.
    reserve_supported: bool,
    /// The current file has disk allocated up to here (at least).
    allocated_end: u64,
    /// The last top-up failed; retried every [`TOPUP_RETRY`] and after every write.
    reserve_short: bool,
    next_topup: Instant,
    /// The next current file, its reserve allocated, waiting for the rotation.
    next_file: Option<File>,
    /// The next file's reserve could not be allocated during this group: rotation waits.
    rotation_deferred: bool,
    /// With [`Fsync::Batch`], the thread that runs the periodic `fdatasync` (so writing goes
    /// on while the disk syncs); `None` in the other modes or where it could not be started.
    syncer: Option<Syncer>,
    /// The writer thread has made its last sync: nothing more is written.
    stopped: bool,
    /// Records go through the writer thread until then (an append on a request thread stalled).
    inline_paused_until: Option<Instant>,
}

/// Runs the batch mode's periodic `fdatasync` beside the writer: a record is acknowledged after
/// its `write(2)` in that mode, so nothing waits for the sync, and before this the writer (and
/// with it every request waiting for its record to be written) stood still for the length of
/// each sync, several milliseconds on this project's disks, every `batch_interval`. One sync at
/// a time; a failure marks the log unhealthy as a write failure does.
struct Syncer {
    tx: mpsc::Sender<File>,
    busy: Arc<AtomicBool>,
}

impl Syncer {
    fn start(shared: Arc<Shared>, base: PathBuf) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<File>();
        let busy = Arc::new(AtomicBool::new(false));
        let done = busy.clone();
        std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || {
                for file in rx {
                    if let Err(e) = file.sync_data() {
                        shared.failed.store(true, Ordering::Release);
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %format!("fsync {}: {e}", base.display()), "audit fsync failed");
                    }
                    drop(file);
                    done.store(false, Ordering::Release);
                }
            })?;
        Ok(Syncer { tx, busy })
    }

    /// Hands a handle of `file` to the sync thread; false when a sync is still under way (or
    /// the handle could not be made), so the caller tries again later.
    fn start_sync(&self, file: &File) -> bool {
        if self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        let sent = file
            .try_clone()
            .is_ok_and(|handle| self.tx.send(handle).is_ok());
        if !sent {
            self.busy.store(false, Ordering::Release);
        }
        sent
    }
}

/// Puts the calling thread (the writer) under `SCHED_BATCH`, so that a record queued by a
/// request does not preempt the request threads at once: on a busy core that was a context
/// switch in and out per record, about a sixth of the gateway's CPU under load (see the README,
/// "Performance"). The writer still gets its fair share of the CPU, runs as soon as the request
/// threads wait for anything (the acknowledgement of a record included), and then takes every
/// record queued by then in one group. Where the policy cannot be set, nothing changes.
#[allow(unsafe_code)]
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` only reads `param`, which lives across the call; pid 0
        // is the calling thread; no memory is handed over.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param) };
        if rc != 0 {
            tracing::debug!("audit writer: SCHED_BATCH not available");
        }
    }
}

/// How often a reserve that could not be topped up is tried again while nothing is written.
const TOPUP_RETRY: Duration = Duration::from_secs(1);

struct Pending {
    rec: Box<AuditRecord>,
    ack: Ack,
    reservation: AuditReservation,
}

/// The writer thread: drains the queue in groups, runs the timers (the batch sync, the reserve
/// top-up), and at shutdown writes what raced in and makes the last sync.
fn run(writer: &Mutex<Writer>, shared: &Shared, rx: Receiver<Msg>) {
    loop {
        let Some(deadline) = lock_writer(writer, shared).map(|w| w.next_deadline()) else {
            return;
        };
        let first = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                let received = if now >= deadline {
                    None
                } else {
                    match rx.recv_timeout(deadline - now) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                };
                match received {
                    Some(m) => m,
                    None => {
                        let Some(mut w) = lock_writer(writer, shared) else {
                            return;
                        };
                        w.on_timer(Instant::now());
                        continue;
                    }
                }
            }
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let mut group = Vec::new();
        let mut shutdown = take(shared, first, &mut group);
        while shutdown.is_none() && group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(m) => shutdown = take(shared, m, &mut group),
                Err(_) => break,
            }
        }
        let Some(mut w) = lock_writer(writer, shared) else {
            return;
        };
        if !group.is_empty() {
            w.commit_group(group);
        }
        if let Some(ack) = shutdown {
            // Nothing new is accepted once `closed` is set; write what raced in before it. The
            // lock is held to the end, and `stopped` keeps request threads from writing after.
            let mut acks = vec![ack];
            loop {
                let mut group = Vec::new();
                while let Ok(m) = rx.try_recv() {
                    acks.extend(take(shared, m, &mut group));
                }
                if group.is_empty() {
                    break;
                }
                w.commit_group(group);
            }
            w.stop();
            drop(w);
            for ack in acks {
                let _ = ack.send(());
            }
            return;
        }
    }
    if let Some(mut w) = lock_writer(writer, shared) {
        w.stop();
    }
}

/// The writer, or `None` once a panic while writing has poisoned its lock: the chain's state is
/// then unknown, so the log closes (every later write fails, requests get 503) and the thread
/// stops.
fn lock_writer<'a>(writer: &'a Mutex<Writer>, shared: &Shared) -> Option<MutexGuard<'a, Writer>> {
    match writer.lock() {
        Ok(w) => Some(w),
        Err(_) => {
            close_after_panic(shared);
            None
        }
    }
}

/// A panic while the writer's lock was held left the chain in an unknown state: nothing more is
/// written, by any thread.
fn close_after_panic(shared: &Shared) {
    shared.closed.store(true, Ordering::Release);
    shared.failed.store(true, Ordering::Release);
}

/// Adds a queued record to `group`; the shutdown's answer when `m` asks for it.
fn take(shared: &Shared, m: Msg, group: &mut Vec<Pending>) -> Option<oneshot::Sender<()>> {
    match m {
        Msg::Record(rec, ack, reservation) => {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            group.push(Pending {
                rec,
                ack,
                reservation,
            });
            None
        }
        Msg::Wake => None,
        Msg::Shutdown(ack) => Some(ack),
    }
}

impl Writer {
    /// When the writer thread has timed work: the batch sync of written data, a reserve top-up
    /// to retry.
    fn next_deadline(&self) -> Option<Instant> {
        let sync_at = (self.dirty && self.fsync == Fsync::Batch)
            .then(|| self.last_sync + self.batch_interval);
        let topup_at = self.reserve_short.then_some(self.next_topup);
        match (sync_at, topup_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether one more record can be written by the calling (request) thread without anything
    /// that waits on the disk beyond an append to a regular file: no `fdatasync` (`always`, or
    /// `batch` without its sync thread), no rotation, no reserve top-up or retry, no cut-back
    /// after a failed write, and no recent stall.
    fn can_write_here(&self, now: Instant) -> bool {
        let room = MAX_RECORD_BYTES as u64;
        let syncs_elsewhere = match self.fsync {
            Fsync::Always => false,
            Fsync::Batch => self.syncer.is_some(),
            Fsync::Never => true,
        };
        let rotates = self.past_rotation_size(self.file_len + room);
        let tops_up = self.reserve_supported && self.reserve_low(self.file_len + room);
        syncs_elsewhere
            && self.regular
            && self.file.is_some()
            && !self.stopped
            && !self.needs_truncate
            && !self.reserve_short
            && !rotates
            && !tops_up
            && self.inline_paused_until.is_none_or(|until| now >= until)
    }

    /// After an append on a request thread that took `took`: one slower than [`INLINE_STALL`]
    /// sends every record through the writer thread for [`INLINE_PAUSE`] from `now`.
    fn note_append_time(&mut self, took: Duration, now: Instant) {
        if took > INLINE_STALL {
            self.inline_paused_until = Some(now + INLINE_PAUSE);
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                "an audit record took long to append; records go through the writer thread for a second"
            );
        }
    }

    /// The batch fsync and the reserve top-up, when due.
    fn on_timer(&mut self, now: Instant) {
        if self.dirty && self.fsync == Fsync::Batch && now >= self.last_sync + self.batch_interval {
            self.periodic_sync();
        }
        if self.reserve_short && now >= self.next_topup {
            self.top_up();
        }
    }

    /// Encodes the group, writes it with one `write(2)` per file it lands in (rotating between
    /// them), syncs per the fsync mode, then answers every waiter.
    fn commit_group(&mut self, group: Vec<Pending>) {
        let mut written: Vec<Ack> = Vec::with_capacity(group.len());
        let mut segment: Vec<Ack> = Vec::with_capacity(group.len());
        let mut segment_first_seq: Option<u64> = None;
        let mut failure: Option<(AuditError, Vec<Ack>)> = None;
        // Given back only once the space they stand for is no longer counted as spare.
        let mut reservations = Vec::with_capacity(group.len());
        self.buf.clear();
        self.rotation_deferred = false;
        let mut group = group.into_iter();
        while let Some(Pending {
            mut rec,
            ack,
            reservation,
        }) = group.next()
        {
            reservations.push(reservation);
            let line_start = self.buf.len();
            let before = (self.next_seq, self.prev_hash.clone());
            if let Err(e) = self.encode(&mut rec) {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                let _ = ack.send(Err(e));
                continue;
            }
            if self.must_rotate_before(line_start) && self.prepare_next() {
                let line = self.buf.split_off(line_start);
                let result = self.write_segment(segment_first_seq).and_then(|()| {
                    self.committed = before;
                    written.append(&mut segment);
                    self.rotate()
                });
                if let Err(e) = result {
                    segment.push(ack);
                    for p in group.by_ref() {
                        segment.push(p.ack);
                        reservations.push(p.reservation);
                    }
                    failure = Some((e, std::mem::take(&mut segment)));
                    break;
                }
                self.buf = line;
                segment_first_seq = None;
            }
            segment_first_seq.get_or_insert(rec.seq);
            segment.push(ack);
        }
        if failure.is_none() && !segment.is_empty() {
            match self.write_segment(segment_first_seq) {
                Ok(()) => {
                    self.committed = (self.next_seq, self.prev_hash.clone());
                    written.append(&mut segment);
                }
                Err(e) => failure = Some((e, segment)),
            }
        }
        let failed_any = failure.is_some();
        if let Some((e, failed)) = failure {
            (self.next_seq, self.prev_hash) = self.committed.clone();
            self.shared.failed.store(true, Ordering::Release);
            self.shared
                .errors
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %e, records = failed.len(), "audit write failed");
            for ack in failed {
                let _ = ack.send(Err(e.clone()));
            }
        }
        self.top_up();
        if written.is_empty() {
            drop(reservations);
            return;
        }
        self.dirty = true;
        let synced = match self.fsync {
            Fsync::Always => self.sync(),
            Fsync::Batch | Fsync::Never => Ok(()),
        };
        match synced {
            Ok(()) => {
                self.shared
                    .written
                    .fetch_add(written.len() as u64, Ordering::Relaxed);
                if !failed_any {
                    self.shared.failed.store(false, Ordering::Release);
                }
                for ack in written {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                self.shared.failed.store(true, Ordering::Release);
                self.shared
                    .errors
                    .fetch_add(written.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, records = written.len(), "audit fsync failed");
                for ack in written {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
        drop(reservations);
        if self.fsync == Fsync::Batch && self.last_sync.elapsed() >= self.batch_interval {
            self.periodic_sync();
        }
    }

    /// Assigns the chain position and appends the line to `buf`.
    fn encode(&mut self, rec: &mut AuditRecord) -> Result<(), AuditError> {
        rec.seq = self.next_seq;
        rec.prev_hash.clone_from(&self.prev_hash);
        if rec.ts.is_empty() {
            rec.ts = format_ts(OffsetDateTime::now_utc());
        }
        chain::normalize(rec);
        chain::canonical_into(rec, &mut self.canon)?;
        if self.canon.len() + LINE_OVERHEAD > MAX_RECORD_BYTES {
            rec.shrink();
            chain::normalize(rec);
            chain::canonical_into(rec, &mut self.canon)?;
            if self.canon.len() + LINE_OVERHEAD > MAX_RECORD_BYTES {
                return Err(AuditError::Encode(format!(
                    "the record is longer than {MAX_RECORD_BYTES} bytes even when shrunk"
                )));
            }
        }
        rec.hash = self.key.digest(&rec.prev_hash, &self.canon);
        chain::push_line(&self.canon, &rec.hash, &mut self.buf);
        self.buf.push(b'\n');
        self.next_seq = self.next_seq.saturating_add(1);
        self.prev_hash.clone_from(&rec.hash);
        Ok(())
    }

    /// Whether the line that starts at `line_start` in `buf` should go to a new file.
    fn must_rotate_before(&self, line_start: usize) -> bool {
        self.regular
            && self.past_rotation_size(self.file_len + self.buf.len() as u64)
            && self.file_len + line_start as u64 > 0
    }

    /// Whether a current file of `len` bytes is past `rotate_bytes` (0: no rotation).
    fn past_rotation_size(&self, len: u64) -> bool {
        self.rotate_bytes > 0 && len > self.rotate_bytes
    }

    /// Whether, with the file at `file_len` bytes, less than half the reserve is left beyond it
    /// (the reserve is then topped up).
    fn reserve_low(&self, file_len: u64) -> bool {
        self.allocated_end.saturating_sub(file_len) < self.reserve_bytes / 2
    }

    /// Appends `buf` to the current file.
    fn write_segment(&mut self, first_seq: Option<u64>) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.open_current().map_err(|e| self.write_error(e))?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(AuditError::Write("no audit file".into()));
        };
        if self.needs_truncate && self.regular {
            file.set_len(self.file_len)
                .map_err(|e| AuditError::Write(format!("{}: {e}", self.base.display())))?;
            // Truncating also gave back the blocks allocated beyond the end.
            self.allocated_end = self.file_len;
        }
        self.needs_truncate = false;
        if let Err(e) = file.write_all(&self.buf) {
            self.needs_truncate = self.regular;
            return Err(self.write_error(e));
        }
        if self.file_len == 0 {
            self.file_first_seq = first_seq;
        }
        self.file_len += self.buf.len() as u64;
        self.dirty = true;
        self.publish_spare();
        Ok(())
    }

    /// Tells the handles how much room the reserve has left.
    fn publish_spare(&self) {
        let spare = if self.regular && self.reserve_supported {
            self.allocated_end.saturating_sub(self.file_len)
        } else {
            u64::MAX
        };
        self.shared.spare.store(spare, Ordering::Release);
    }

    /// Allocates `reserve_bytes` beyond the end of the current file once less than half of it is
    /// left. A failure (the disk is full) is logged once and retried later; in the meantime the
    /// reservations already taken are still covered by what is left.
    fn top_up(&mut self) {
        if !(self.regular && self.reserve_supported) {
            self.publish_spare();
            return;
        }
        let Some(file) = self.file.as_ref() else {
            return;
        };
        if !self.reserve_low(self.file_len) {
            return;
        }
        match preallocate(file, self.file_len, self.reserve_bytes) {
            Ok(()) => {
                self.allocated_end = self.file_len + self.reserve_bytes;
                if self.reserve_short {
                    tracing::info!("the audit disk reserve is allocated again");
                }
                self.reserve_short = false;
            }
            Err(e) if is_unsupported(&e) => {
                self.reserve_supported = false;
                self.reserve_short = false;
                tracing::warn!(
                    file = %self.base.display(),
                    "the filesystem cannot preallocate (fallocate): the audit log has no disk reserve, a full disk is only noticed when a write fails"
                );
            }
            Err(e) => {
                if !self.reserve_short {
                    tracing::error!(
                        file = %self.base.display(),
                        error = %e,
                        "the audit disk reserve cannot be topped up; requests in flight are still recorded, new ones get 503 audit_unavailable once the reserve is used up"
                    );
                }
                self.reserve_short = true;
                self.next_topup = Instant::now() + TOPUP_RETRY;
            }
        }
        self.publish_spare();
    }

    /// The next current file, created next to the current one with its reserve allocated.
    /// False when that allocation fails: the rotation waits (the current file grows past
    /// `rotate_bytes` into its own reserve) and is tried again with the next group.
    fn prepare_next(&mut self) -> bool {
        if self.next_file.is_some() {
            return true;
        }
        if self.rotation_deferred {
            return false;
        }
        let path = self.next_path();
        let _ = fs::remove_file(&path);
        let prepared = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .and_then(|f| {
                if self.reserve_supported {
                    preallocate(&f, 0, self.reserve_bytes)?;
                }
                Ok(f)
            });
        match prepared {
            Ok(f) => {
                self.next_file = Some(f);
                true
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                self.rotation_deferred = true;
                tracing::warn!(
                    file = %self.base.display(),
                    error = %e,
                    "audit rotation postponed: the new file's disk reserve cannot be allocated"
                );
                false
            }
        }
    }

    fn next_path(&self) -> PathBuf {
        let name = self
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.base.with_file_name(format!("{name}.next"))
    }

    fn write_error(&self, e: io::Error) -> AuditError {
        AuditError::Write(format!("{}: {e}", self.base.display()))
    }

    /// Renames the current file after its first seq and starts a new one.
    /// Syncs in every fsync mode: only the newest file is repaired after a crash, so a rotated
    /// file must be complete on disk.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        let first = self.file_first_seq.unwrap_or(self.committed.0);
        let target = rotated_file_name(&self.base, first);
        if fs::symlink_metadata(&target).is_ok() {
            return Err(AuditError::Write(format!(
                "cannot rotate: {} already exists",
                target.display()
            )));
        }
        fs::rename(&self.base, &target).map_err(|e| {
            AuditError::Write(format!(
                "cannot rotate {} to {}: {e}",
                self.base.display(),
                target.display()
            ))
        })?;
        let old = self.file.take();
        let old_len = self.file_len;
        self.file_len = 0;
        self.file_first_seq = None;
        self.needs_truncate = false;
        let next = self.next_file.take();
        match next {
            Some(f) if fs::rename(self.next_path(), &self.base).is_ok() => {
                self.file = Some(f);
                self.allocated_end = if self.reserve_supported {
                    self.reserve_bytes
                } else {
                    0
                };
                self.publish_spare();
            }
            _ => self.open_current().map_err(|e| self.write_error(e))?,
        }
        sync_dir(&self.base);
        // The rotated file's reserve is given back (truncating to its size frees the blocks
        // allocated beyond it).
        if let Some(old) = old {
            let _ = old.set_len(old_len);
        }
        Ok(())
    }

    fn open_current(&mut self) -> io::Result<()> {
        let existed = self.base.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.base)?;
        let meta = file.metadata()?;
        self.regular = meta.is_file();
        self.file_len = if self.regular { meta.len() } else { 0 };
        if self.file_len == 0 {
            self.file_first_seq = None;
        }
        self.file = Some(file);
        if !existed {
            sync_dir(&self.base);
        }
        // Whatever was allocated beyond the end before is not known: allocate (again).
        self.allocated_end = self.file_len;
        self.top_up();
        Ok(())
    }

    /// Syncs the current file now. A sync still under way on the sync thread counts as not yet
    /// done (rotation and shutdown must not go on before the data is on disk).
    fn sync(&mut self) -> Result<(), AuditError> {
        let in_background = self
            .syncer
            .as_ref()
            .is_some_and(|s| s.busy.load(Ordering::Acquire));
        if !self.dirty && !in_background {
            return Ok(());
        }
        let Some(file) = self.file.as_ref() else {
            // Only after a rotation, which synced the renamed file first.
            self.dirty = false;
            return Ok(());
        };
        file.sync_data()
            .map_err(|e| AuditError::Write(format!("fsync {}: {e}", self.base.display())))?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn periodic_sync(&mut self) {
        if let (Some(syncer), Some(file)) = (&self.syncer, &self.file)
            && self.dirty
        {
            // Handed over, or one still running: either way the next try is an interval away.
            if syncer.start_sync(file) {
                self.dirty = false;
            }
            self.last_sync = Instant::now();
            return;
        }
        if let Err(e) = self.sync() {
            self.shared.failed.store(true, Ordering::Release);
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit fsync failed");
            // Do not spin on a failing disk: try again after the next write or interval.
            self.dirty = false;
            self.last_sync = Instant::now();
        }
    }

    /// The last sync, then the file, the next file and the sync thread are let go (a reader of
    /// a pipe sees its end) and nothing more is written.
    fn stop(&mut self) {
        self.final_sync();
        self.stopped = true;
        self.file = None;
        self.next_file = None;
        self.syncer = None;
    }

    fn final_sync(&mut self) {
        if let Err(e) = self.sync() {
            self.shared.failed.store(true, Ordering::Release);
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit fsync at shutdown failed");
        }
    }
}

/// Allocates `[offset, offset + len)` of `file` without changing its size.
fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The filesystem (or platform) has no `fallocate` with `FALLOC_FL_KEEP_SIZE`.
fn is_unsupported(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        let raw = e.raw_os_error();
        e.kind() == io::ErrorKind::Unsupported
            || raw == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
            || raw == Some(rustix::io::Errno::NOSYS.raw_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    {
        e.kind() == io::ErrorKind::Unsupported
    }
}

/// Makes a created or renamed file name durable. Best effort: not every platform allows it.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            capacity: 1,
            written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            spare: AtomicU64::new(0),
        })
    }

    #[test]
    fn batch_sync_is_handed_to_its_thread_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let file = File::create(&path).unwrap();
        let shared = shared();
        let syncer = Syncer::start(shared.clone(), path).unwrap();
        // One under way: the next is refused, and nothing more is queued behind it.
        syncer.busy.store(true, Ordering::Release);
        assert!(!syncer.start_sync(&file));
        syncer.busy.store(false, Ordering::Release);
        assert!(
            syncer.start_sync(&file),
            "an idle sync thread takes the sync"
        );
        // The thread syncs and becomes free again.
        let free = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !syncer.busy.load(Ordering::Acquire)
        });
        assert!(free, "the sync never completed");
        assert!(syncer.start_sync(&file));
        assert!(!shared.failed.load(Ordering::Acquire));
        assert_eq!(shared.errors.load(Ordering::Relaxed), 0);
    }

    fn record() -> AuditRecord {
        AuditRecord {
            request_id: "req-1".into(),
            method: "GET".into(),
            ..AuditRecord::default()
        }
    }

    fn settings(dir: &Path, fsync: Fsync) -> AuditSettings {
        AuditSettings {
            fsync,
            batch_interval: Duration::from_millis(10),
            ..AuditSettings::new(dir.join("audit.jsonl"))
        }
    }

    /// A record appended on a request thread leaves data to sync while the writer thread sleeps
    /// with no timer: the wake-up it is sent starts the timer, and the sync happens.
    #[tokio::test]
    async fn batch_sync_follows_a_record_written_by_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(AuditSettings {
            batch_interval: Duration::from_millis(200),
            ..settings(dir.path(), Fsync::Batch)
        })
        .unwrap();
        let write_here = || {
            let reservation = log.reserve().unwrap();
            let result = log.write_here(Box::new(record()), reservation);
            assert!(matches!(result, Ok(Ok(()))), "not written by the caller");
        };
        // An interval after opening, the first record's own write hands its sync over at once;
        // the second is written within the next interval, and the thread sleeps untimed.
        std::thread::sleep(Duration::from_millis(250));
        write_here();
        write_here();
        assert!(
            log.inner.writer.lock().unwrap().dirty,
            "nothing left to sync"
        );
        let synced = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !log.inner.writer.lock().unwrap().dirty
        });
        assert!(synced, "the written record was never synced");
        log.shutdown().await;
    }

    /// What keeps a record off the caller's thread: `always`, a rotation or a reserve top-up it
    /// would bring, a recent stall, a failed write to cut back, and a stopped writer.
    #[tokio::test]
    async fn records_that_may_wait_on_the_disk_are_left_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let always = AuditLog::open(settings(&dir.path().join("a"), Fsync::Always)).unwrap();
        assert!(
            !always
                .inner
                .writer
                .lock()
                .unwrap()
                .can_write_here(Instant::now())
        );
        always.shutdown().await;

        let log = AuditLog::open(settings(&dir.path().join("b"), Fsync::Never)).unwrap();
        let now = Instant::now();
        let writer = &log.inner.writer;
        assert!(writer.lock().unwrap().can_write_here(now));
        type Change = fn(&mut Writer);
        let cases: [(&str, Change); 5] = [
            ("a rotation", |w| w.rotate_bytes = w.file_len + 1),
            ("a top-up", |w| w.allocated_end = w.file_len + 1),
            ("a stall", |w| {
                w.inline_paused_until = Some(Instant::now() + Duration::from_secs(60))
            }),
            ("a cut-back", |w| w.needs_truncate = true),
            ("a stopped writer", |w| w.stopped = true),
        ];
        for (what, change) in cases {
            let mut w = writer.lock().unwrap();
            let saved = (
                w.rotate_bytes,
                w.allocated_end,
                w.inline_paused_until,
                w.needs_truncate,
                w.stopped,
            );
            change(&mut w);
            assert!(!w.can_write_here(now), "{what}: written by the caller");
            (
                w.rotate_bytes,
                w.allocated_end,
                w.inline_paused_until,
                w.needs_truncate,
                w.stopped,
            ) = saved;
            assert!(w.can_write_here(now));
        }
        log.shutdown().await;
    }

    /// A slow append on a request thread keeps records off request threads for a second; a
    /// quick one does not.
    #[tokio::test]
    async fn a_stalled_append_sends_records_through_the_writer_thread_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Fsync::Batch)).unwrap();
        {
            let mut w = log.inner.writer.lock().unwrap();
            let now = Instant::now();
            w.note_append_time(INLINE_STALL / 2, now);
            assert!(w.can_write_here(now), "a quick append paused writing here");
            w.note_append_time(INLINE_STALL * 2, now);
            assert!(!w.can_write_here(now + INLINE_PAUSE / 2));
            assert!(w.can_write_here(now + INLINE_PAUSE));
        }
        log.shutdown().await;
    }

    /// A panic while the writer's lock is held leaves the chain in an unknown state: the log
    /// closes, and no record is acknowledged after it.
    #[tokio::test]
    async fn a_panic_holding_the_writer_closes_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(settings(dir.path(), Fsync::Batch)).unwrap();
        log.write(record()).await.unwrap();
        let writer = log.inner.writer.clone();
        let _ = std::thread::spawn(move || {
            let _held = writer.lock().unwrap();
            panic!("while writing");
        })
        .join();
        assert_eq!(log.write(record()).await, Err(AuditError::Closed));
        assert!(!log.healthy());
        assert_eq!(log.records_written(), 1);
        assert_eq!(log.errors(), 1, "the refused record is not counted");
    }
}
