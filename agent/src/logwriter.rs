//! The one thread that writes the agent's log lines to stderr. Lines are queued where they
//! are logged and written from here: written in place, a stalled journald (a full stderr
//! pipe) blocked every tokio worker that logged, and with them the job's timeout, the
//! output pumps and so the job itself, blocked on its own stdout. The queue is bounded and
//! lossy: past [`MAX_QUEUED_BYTES`] lines are dropped, counted, and said in one line once
//! the queue has drained.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The most bytes of lines waiting to be written (a line is at most 32 KiB): a journal that
/// does not keep up costs this much memory, then lines.
const MAX_QUEUED_BYTES: usize = 4 << 20;

/// The queue, once [`start`] has run (and its thread with it); before it, lines are written
/// in place.
static QUEUE: OnceLock<&'static Queue> = OnceLock::new();

struct Queue {
    state: Mutex<State>,
    /// Signalled by [`send`] when it queues a line; the writer waits on it when idle.
    queued: Condvar,
    /// Signalled by the writer when it has written all there was; [`flush`] waits on it.
    idle: Condvar,
    /// Says how many lines were dropped, as a log event of its own (called by the writer
    /// with no lock held; the line it logs comes back through [`send`]).
    say_dropped: fn(u64),
}

struct State {
    /// Whole lines, each written with one `write_all`.
    lines: VecDeque<Vec<u8>>,
    /// The bytes in `lines`, against [`MAX_QUEUED_BYTES`].
    bytes: usize,
    /// Lines dropped since the writer last said so; [`send`] adds, the writer takes.
    dropped: u64,
    /// The writer holds a line it took from `lines` and has not finished writing.
    writing: bool,
}

/// Starts the writer thread; from now on [`send`] queues. `say_dropped` logs the count of
/// lines dropped, once the queue drains after a stall.
pub fn start(say_dropped: fn(u64)) {
    if QUEUE.get().is_some() {
        return;
    }
    // Without the thread nothing would drain the queue: lines are written in place then.
    if let Some(queue) = Queue::spawn(say_dropped, std::io::stderr()) {
        let _ = QUEUE.set(queue);
    }
}

/// One whole line (ending in a newline) to stderr: queued once [`start`] has run, written
/// at once before. Never blocks on stderr after [`start`]; a line that does not fit in the
/// queue is dropped and counted.
pub fn send(line: Vec<u8>) {
    match QUEUE.get() {
        Some(q) => q.send(line),
        None => {
            let _ = std::io::stderr().lock().write_all(&line);
        }
    }
}

/// Waits until every line queued so far is written, for `limit` at most: before the process
/// exits, a slow journal still gets the last lines (the job's end), a stalled one does not
/// keep the agent from exiting.
pub fn flush(limit: Duration) {
    if let Some(q) = QUEUE.get() {
        q.flush(limit);
    }
}

impl Queue {
    /// A queue, and the thread that writes it to `out`; `None` if no thread could start.
    fn spawn(say_dropped: fn(u64), out: impl Write + Send + 'static) -> Option<&'static Queue> {
        // Lives as long as the process, as the thread that drains it.
        let queue: &'static Queue = Box::leak(Box::new(Queue {
            state: Mutex::new(State {
                lines: VecDeque::new(),
                bytes: 0,
                dropped: 0,
                writing: false,
            }),
            queued: Condvar::new(),
            idle: Condvar::new(),
            say_dropped,
        }));
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || queue.write_all_queued(out))
            .ok()
            .map(|_| queue)
    }

    fn send(&self, line: Vec<u8>) {
        let mut st = self.lock();
        if st.bytes.saturating_add(line.len()) > MAX_QUEUED_BYTES {
            st.dropped += 1;
            return;
        }
        st.bytes += line.len();
        st.lines.push_back(line);
        drop(st);
        self.queued.notify_one();
    }

    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        while !st.lines.is_empty() || st.writing || st.dropped > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = match self.idle.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The writer thread: writes lines in order, and after a stall, once the queue is
    /// empty, has the count of lines dropped said.
    fn write_all_queued(&self, mut out: impl Write) {
        let mut st = self.lock();
        loop {
            if let Some(line) = st.lines.pop_front() {
                st.bytes -= line.len();
                st.writing = true;
                drop(st);
                // A closed stderr loses lines, never the agent.
                let _ = out.write_all(&line);
                st = self.lock();
                st.writing = false;
                continue;
            }
            if st.dropped > 0 {
                let dropped = std::mem::take(&mut st.dropped);
                drop(st);
                (self.say_dropped)(dropped);
                st = self.lock();
                continue;
            }
            self.idle.notify_all();
            st = match self.queued.wait(st) {
                Ok(st) => st,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// The state, also after a panic while it was held: every update leaves it whole.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static SAID: AtomicU64 = AtomicU64::new(0);

    /// A writer that blocks (a stalled journal) never blocks `send`: what does not fit is
    /// dropped and counted, the rest is written in order once the writer moves again, and the
    /// count is said once it has drained; a flush waits no longer than its limit.
    #[test]
    fn a_stalled_writer_costs_lines_not_the_sender() {
        let (unread, stderr) = nix::unistd::pipe().unwrap();
        let q = Queue::spawn(
            |n| {
                SAID.fetch_add(n, Ordering::SeqCst);
            },
            std::fs::File::from(stderr),
        )
        .unwrap();
        let line = |i: usize| format!("{i:07} {}\n", "x".repeat(1000)).into_bytes();
        let sent = 2 * MAX_QUEUED_BYTES / 1000;
        let started = Instant::now();
        for i in 0..sent {
            q.send(line(i));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "send blocked");
        let dropped = q.lock().dropped;
        assert!(dropped > 0);
        let flushing = Instant::now();
        q.flush(Duration::from_millis(300));
        let waited = flushing.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3));
        // The journal reads again: it gets the first lines, whole and in order.
        let kept = sent - dropped as usize;
        let len = line(0).len();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut all = vec![0; kept * len];
            std::fs::File::from(unread).read_exact(&mut all).unwrap();
            all
        });
        q.flush(Duration::from_secs(30));
        assert_eq!(SAID.load(Ordering::SeqCst), dropped);
        let st = q.lock();
        assert!(st.lines.is_empty() && st.dropped == 0 && st.bytes == 0);
        drop(st);
        let written = reader.join().unwrap();
        assert!(written.chunks(len).enumerate().all(|(i, l)| l == line(i)));
    }
}
