//! What an attempt printed, captured for its log (`POST /internal/task-logs`):
//! an `exec` task's stderr (its stdout is its output), a bundle runner's
//! stdout and stderr while it serves the attempt (a cold start's init
//! included). Bounded: past `cap` bytes the head (a quarter) and the tail
//! are kept, the cut is marked in the text, and the dropped bytes are
//! counted. The tokens handed to the task are replaced before upload; the
//! dispatcher redacts secrets again before storing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dispatcher_wire as wire;

/// Room kept for the marker of a cut.
const MARKER_ROOM: usize = 96;

pub struct LogBuffer {
    head_cap: usize,
    tail_cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

/// A buffer the readers of an attempt's output write into while the
/// attempt's handler reads what is there when it ends, however it ends.
pub type Shared = Arc<Mutex<LogBuffer>>;

impl LogBuffer {
    /// A buffer keeping at most `cap` bytes of text (0: keeps nothing).
    pub fn new(cap: usize) -> LogBuffer {
        let body = cap.saturating_sub(MARKER_ROOM);
        LogBuffer {
            head_cap: body / 4,
            tail_cap: body - body / 4,
            head: Vec::new(),
            tail: VecDeque::new(),
            total: 0,
        }
    }

    pub fn shared(cap: usize) -> Shared {
        Arc::new(Mutex::new(LogBuffer::new(cap)))
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let to_head = bytes.len().min(self.head_cap - self.head.len());
        self.head.extend_from_slice(&bytes[..to_head]);
        bytes = &bytes[to_head..];
        if self.tail_cap == 0 {
            return;
        }
        if bytes.len() >= self.tail_cap {
            self.tail.clear();
            bytes = &bytes[bytes.len() - self.tail_cap..];
        }
        let over = (self.tail.len() + bytes.len()).saturating_sub(self.tail_cap);
        self.tail.drain(..over);
        self.tail.extend(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The last `n` characters printed (what explains a failure).
    pub fn tail_text(&self, n: usize) -> String {
        let (a, b) = self.tail.as_slices();
        let bytes: Vec<u8> = if self.tail.is_empty() {
            self.head.clone()
        } else if (self.total as usize) == self.head.len() + self.tail.len() {
            // Nothing dropped: head and tail are one text.
            [&self.head[..], a, b].concat()
        } else {
            [a, b].concat()
        };
        let text = String::from_utf8_lossy(&bytes);
        let skip = text.chars().count().saturating_sub(n);
        text.chars().skip(skip).collect()
    }

    /// The upload: the text with a cut marked on line boundaries, the
    /// `secrets` replaced; `None` when nothing was printed.
    pub fn request(&self, secrets: &[&str]) -> Option<wire::TaskLogRequest> {
        if self.is_empty() || self.head_cap + self.tail_cap == 0 {
            return None;
        }
        let (a, b) = self.tail.as_slices();
        let tail: Vec<u8> = [a, b].concat();
        let kept = (self.head.len() + tail.len()) as u64;
        let (mut text, dropped) = if kept == self.total {
            (
                String::from_utf8_lossy(&[&self.head[..], &tail[..]].concat()).into_owned(),
                0,
            )
        } else {
            // Cut at line ends, so no line is shown half.
            let head = match self.head.iter().rposition(|&c| c == b'\n') {
                Some(i) => &self.head[..=i],
                None => &self.head[..],
            };
            let tail = match tail.iter().position(|&c| c == b'\n') {
                Some(i) if i + 1 < tail.len() => &tail[i + 1..],
                _ => &tail[..],
            };
            let dropped = self.total - (head.len() + tail.len()) as u64;
            let mut text = String::from_utf8_lossy(head).into_owned();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[… {dropped} bytes dropped …]\n"));
            text.push_str(&String::from_utf8_lossy(tail));
            (text, dropped)
        };
        for secret in secrets.iter().filter(|s| s.len() >= 16) {
            text = text.replace(secret, "[REDACTED]");
        }
        Some(wire::TaskLogRequest {
            log: text,
            dropped_bytes: dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::LogBuffer;

    #[test]
    fn a_short_output_is_kept_whole_and_a_secret_is_replaced() {
        let mut b = LogBuffer::new(1024);
        assert!(b.request(&[]).is_none(), "nothing printed: no upload");
        b.push(b"hello\n");
        b.push(b"token eyJsecretsecretsecret\n");
        let r = b.request(&["eyJsecretsecretsecret"]).unwrap();
        assert_eq!(r.log, "hello\ntoken [REDACTED]\n");
        assert_eq!(r.dropped_bytes, 0);
        assert_eq!(b.tail_text(6), "ecret\n");
    }

    #[test]
    fn a_long_output_keeps_its_head_and_tail_within_the_bound_and_marks_the_cut() {
        let cap = 4096;
        let mut b = LogBuffer::new(cap);
        let mut all = String::new();
        for i in 0..2000 {
            let line = format!("line {i:05}\n");
            all.push_str(&line);
            b.push(line.as_bytes());
        }
        let r = b.request(&[]).unwrap();
        assert!(r.log.len() <= cap, "{} bytes", r.log.len());
        assert!(r.log.starts_with("line 00000\n"), "the head is kept");
        assert!(r.log.ends_with("line 01999\n"), "the tail is kept");
        let marker = format!("[… {} bytes dropped …]\n", r.dropped_bytes);
        assert!(r.log.contains(&marker), "{}", r.log);
        // Every kept line is whole, and what is kept plus what was dropped
        // is everything printed.
        let kept: String = r.log.replace(&marker, "");
        for line in kept.lines() {
            assert!(line.len() == 10 && line.starts_with("line "), "{line:?}");
        }
        assert_eq!(kept.len() as u64 + r.dropped_bytes, all.len() as u64);
        assert!(b.tail_text(11).ends_with("line 01999\n"));
    }

    #[test]
    fn one_huge_write_keeps_only_what_fits() {
        let mut b = LogBuffer::new(1000);
        b.push(&vec![b'x'; 10_000]);
        let r = b.request(&[]).unwrap();
        assert!(r.log.len() <= 1000);
        assert!(r.dropped_bytes >= 9000);
        let mut off = LogBuffer::new(0);
        off.push(b"ignored");
        assert!(off.request(&[]).is_none(), "a bound of 0 captures nothing");
    }
}
