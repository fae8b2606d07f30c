//! Receiving: one `recvmsg` at a time, and the [`Reassembler`] that puts a
//! message's pieces together into a whole record.

use std::io;
use std::os::fd::AsFd;

use super::{Notification, RcvInfo};
use crate::sys::sctp as sys;

/// `msg_flags` bit: the data is a notification, not a peer's message.
const MSG_NOTIFICATION: i32 = 0x8000;

/// What one `recvmsg` returned: a piece of a message or notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recv {
    /// Bytes received; 0 without `eor` means the peer shut the association
    /// down (SCTP messages are never empty).
    pub len: usize,
    /// `MSG_EOR`: this piece ends the message.
    pub eor: bool,
    /// `MSG_NOTIFICATION`: the bytes are a notification from the kernel.
    pub notification: bool,
    /// Present when [`set_recv_rcvinfo`](super::set_recv_rcvinfo) is on and this is data.
    pub info: Option<RcvInfo>,
}

/// One `recvmsg` into `buf`. A message larger than `buf` (or than the socket's
/// receive buffer: partial delivery) arrives in several pieces, the last one
/// with `eor`; [`Reassembler`] puts them together.
pub fn recv(fd: impl AsFd, buf: &mut [u8]) -> io::Result<Recv> {
    let r = sys::recvmsg(fd.as_fd(), buf)?;
    Ok(Recv {
        len: r.len,
        eor: r.flags & libc::MSG_EOR != 0,
        notification: r.flags & MSG_NOTIFICATION != 0,
        info: r.rcvinfo.map(|i| RcvInfo {
            sid: i.rcv_sid,
            ssn: i.rcv_ssn,
            flags: i.rcv_flags,
            ppid: i.rcv_ppid,
            tsn: i.rcv_tsn,
            cumtsn: i.rcv_cumtsn,
            context: i.rcv_context,
            assoc_id: i.rcv_assoc_id,
        }),
    })
}

/// A whole record, as [`Reassembler::recv_once`] returns it; its bytes are in
/// [`Reassembler::message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A peer's message, with its stream, PPID and flags (all zero if
    /// `SCTP_RECVRCVINFO` is off).
    Data(RcvInfo),
    /// A kernel notification; never to be relayed.
    Notification(Notification),
    /// A message larger than the reassembly limit: its `len` bytes were
    /// read and thrown away (the association goes on).
    Oversized { len: usize, info: RcvInfo },
    /// The peer shut down: no more messages will come.
    Eof,
}

/// Puts the pieces of a message (or notification) together until `MSG_EOR`.
///
/// The buffer grows (doubling) up to a limit, and shrinks back to its initial
/// size after a large message, so an association costs its initial size at
/// rest. A message larger than the limit is read to its end and reported as
/// [`Received::Oversized`] instead.
#[derive(Debug)]
pub struct Reassembler {
    buf: Vec<u8>,
    filled: usize,
    /// The current record has been returned; the next call starts a new one.
    done: bool,
    /// From the record's first piece.
    notification: bool,
    info: Option<RcvInfo>,
    /// Bytes of an oversized message thrown away so far.
    skipped: usize,
    initial: usize,
    limit: usize,
}

impl Reassembler {
    /// `initial` bytes of buffer, growing to at most `limit` for one message.
    pub fn new(initial: usize, limit: usize) -> Reassembler {
        let initial = initial.clamp(1, limit.max(1));
        Reassembler {
            buf: vec![0; initial],
            filled: 0,
            done: false,
            notification: false,
            info: None,
            skipped: 0,
            initial,
            limit: limit.max(initial),
        }
    }

    /// The record the last successful call returned.
    pub fn message(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// True while part of a message has arrived and the rest has not.
    pub fn in_progress(&self) -> bool {
        !self.done && self.filled > 0
    }

    /// One `recvmsg`. `Ok(Some(..))` once a record is whole, `Ok(None)` after
    /// a piece (call again). On a non-blocking socket `WouldBlock` keeps the
    /// pieces so far, so this can be retried whenever the socket is readable.
    pub fn recv_once(&mut self, fd: impl AsFd) -> io::Result<Option<Received>> {
        if self.done {
            self.done = false;
            self.filled = 0;
            self.notification = false;
            self.info = None;
            self.skipped = 0;
            if self.buf.len() > self.initial {
                self.buf = vec![0; self.initial];
            }
        }
        if self.filled == self.buf.len() {
            if self.buf.len() >= self.limit {
                // Too large to keep: read the rest into the same space.
                self.skipped += self.filled;
                self.filled = 0;
            } else {
                let grown = (self.buf.len() * 2).min(self.limit);
                self.buf.resize(grown, 0);
            }
        }
        let r = recv(fd.as_fd(), &mut self.buf[self.filled..])?;
        if r.len == 0 && !r.eor && !r.notification {
            // A partial message cut off by the end is lost with it.
            self.filled = 0;
            self.done = true;
            return Ok(Some(Received::Eof));
        }
        if self.filled == 0 && self.skipped == 0 {
            self.notification = r.notification;
        }
        if self.info.is_none() {
            self.info = r.info;
        }
        self.filled += r.len;
        if !r.eor {
            return Ok(None);
        }
        self.done = true;
        if self.skipped > 0 {
            let len = self.skipped + self.filled;
            self.filled = 0;
            return Ok(Some(Received::Oversized {
                len,
                info: self.info.unwrap_or_default(),
            }));
        }
        if self.notification {
            Ok(Some(Received::Notification(Notification::parse(
                self.message(),
            ))))
        } else {
            Ok(Some(Received::Data(self.info.unwrap_or_default())))
        }
    }

    /// Receives one whole record on a blocking socket (for tests and tools).
    pub fn recv_blocking(&mut self, fd: impl AsFd) -> io::Result<Received> {
        loop {
            if let Some(r) = self.recv_once(fd.as_fd())? {
                return Ok(r);
            }
        }
    }
}
