//! Notifications: what the kernel reports about an association, decoded
//! from `union sctp_notification`.

use std::fmt;

/// A notification from the kernel about the association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// `SCTP_ASSOC_CHANGE`.
    AssocChange {
        state: AssocState,
        /// A protocol error cause code, when the change is a failure.
        error: u16,
        outbound_streams: u16,
        inbound_streams: u16,
    },
    /// `SCTP_SHUTDOWN_EVENT`: the peer sent SHUTDOWN; it sends no more.
    Shutdown,
    /// `SCTP_PARTIAL_DELIVERY_EVENT` (indication 0: the partly delivered
    /// message was aborted).
    PartialDelivery { indication: u32, stream: u32 },
    /// `SCTP_REMOTE_ERROR`: an operational error the peer reported.
    RemoteError { error: u16 },
    /// Any other type (`sn_type`), or a truncated notification (type 0).
    Other { kind: u16 },
}

/// `sac_state` of [`Notification::AssocChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssocState {
    /// The association is up.
    CommUp,
    /// The association failed: the peer aborted, or it stopped answering.
    CommLost,
    /// The peer restarted.
    Restart,
    /// A graceful shutdown completed.
    ShutdownComplete,
    /// The association could not be set up.
    CantStart,
    Unknown(u16),
}

const SCTP_ASSOC_CHANGE: u16 = 0x8001;
const SCTP_REMOTE_ERROR: u16 = 0x8004;
const SCTP_SHUTDOWN_EVENT: u16 = 0x8005;
const SCTP_PARTIAL_DELIVERY_EVENT: u16 = 0x8006;

impl Notification {
    /// Decodes a whole notification (`union sctp_notification`).
    pub fn parse(b: &[u8]) -> Notification {
        let u16_at = |i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
        let u32_at = |i: usize| {
            b.get(i..i + 4)
                .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        };
        let Some(kind) = u16_at(0) else {
            return Notification::Other { kind: 0 };
        };
        // Header: type u16, flags u16, length u32; the body follows at 8.
        let parsed = match kind {
            SCTP_ASSOC_CHANGE => (|| {
                let state = match u16_at(8)? {
                    0 => AssocState::CommUp,
                    1 => AssocState::CommLost,
                    2 => AssocState::Restart,
                    3 => AssocState::ShutdownComplete,
                    4 => AssocState::CantStart,
                    n => AssocState::Unknown(n),
                };
                Some(Notification::AssocChange {
                    state,
                    error: u16_at(10)?,
                    outbound_streams: u16_at(12)?,
                    inbound_streams: u16_at(14)?,
                })
            })(),
            SCTP_SHUTDOWN_EVENT => Some(Notification::Shutdown),
            SCTP_PARTIAL_DELIVERY_EVENT => (|| {
                Some(Notification::PartialDelivery {
                    indication: u32_at(8)?,
                    stream: u32_at(16)?,
                })
            })(),
            // sre_error is in network byte order.
            SCTP_REMOTE_ERROR => b.get(8..10).map(|s| Notification::RemoteError {
                error: u16::from_be_bytes([s[0], s[1]]),
            }),
            _ => None,
        };
        parsed.unwrap_or(Notification::Other { kind })
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notification::AssocChange {
                state,
                error,
                outbound_streams,
                inbound_streams,
            } => write!(
                f,
                "association change {state:?} (streams out/in {outbound_streams}/{inbound_streams}, error {error})"
            ),
            Notification::Shutdown => f.write_str("peer began shutdown"),
            Notification::PartialDelivery { indication, stream } => {
                write!(f, "partial delivery event {indication} on stream {stream}")
            }
            Notification::RemoteError { error } => write!(f, "peer reported error cause {error}"),
            Notification::Other { kind } => write!(f, "notification type {kind:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notifications() {
        let mut b = Vec::new();
        b.extend_from_slice(&SCTP_ASSOC_CHANGE.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&20u32.to_ne_bytes());
        for v in [1u16, 0, 10, 65535] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&7i32.to_ne_bytes());
        assert_eq!(
            Notification::parse(&b),
            Notification::AssocChange {
                state: AssocState::CommLost,
                error: 0,
                outbound_streams: 10,
                inbound_streams: 65535
            }
        );
        assert_eq!(
            Notification::parse(&b[..10]),
            Notification::Other {
                kind: SCTP_ASSOC_CHANGE
            }
        );
        assert_eq!(Notification::parse(&[]), Notification::Other { kind: 0 });
        let mut s = SCTP_SHUTDOWN_EVENT.to_ne_bytes().to_vec();
        s.extend_from_slice(&[0; 10]);
        assert_eq!(Notification::parse(&s), Notification::Shutdown);
    }

    mod props {
        //! Notifications against generated bytes.

        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        /// A notification in the kernel's layout: type, flags, length,
        /// then the body.
        fn notification(kind: u16, body: &[u8]) -> Vec<u8> {
            let mut b = kind.to_ne_bytes().to_vec();
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&((8 + body.len()) as u32).to_ne_bytes());
            b.extend_from_slice(body);
            b
        }

        fn state(n: u16) -> AssocState {
            match n {
                0 => AssocState::CommUp,
                1 => AssocState::CommLost,
                2 => AssocState::Restart,
                3 => AssocState::ShutdownComplete,
                4 => AssocState::CantStart,
                n => AssocState::Unknown(n),
            }
        }

        /// A notification and its bytes.
        fn encoded() -> impl Strategy<Value = (Notification, Vec<u8>)> {
            prop_oneof![
                (
                    0..6u16,
                    any::<[u16; 3]>(),
                    any::<i32>(),
                    vec(any::<u8>(), 0..8)
                )
                    .prop_map(
                        |(st, [error, outbound_streams, inbound_streams], id, info)| {
                            let mut body = Vec::new();
                            for v in [st, error, outbound_streams, inbound_streams] {
                                body.extend_from_slice(&v.to_ne_bytes());
                            }
                            body.extend_from_slice(&id.to_ne_bytes());
                            body.extend_from_slice(&info);
                            let n = Notification::AssocChange {
                                state: state(st),
                                error,
                                outbound_streams,
                                inbound_streams,
                            };
                            (n, notification(SCTP_ASSOC_CHANGE, &body))
                        }
                    ),
                any::<i32>().prop_map(|id| {
                    (
                        Notification::Shutdown,
                        notification(SCTP_SHUTDOWN_EVENT, &id.to_ne_bytes()),
                    )
                }),
                any::<[u32; 4]>().prop_map(|[indication, id, stream, seq]| {
                    let mut body = Vec::new();
                    for v in [indication, id, stream, seq] {
                        body.extend_from_slice(&v.to_ne_bytes());
                    }
                    let n = Notification::PartialDelivery { indication, stream };
                    (n, notification(SCTP_PARTIAL_DELIVERY_EVENT, &body))
                }),
                (any::<u16>(), vec(any::<u8>(), 0..16)).prop_map(|(error, data)| {
                    let mut body = error.to_be_bytes().to_vec();
                    body.extend_from_slice(&[0; 2]);
                    body.extend_from_slice(&0i32.to_ne_bytes());
                    body.extend_from_slice(&data);
                    (
                        Notification::RemoteError { error },
                        notification(SCTP_REMOTE_ERROR, &body),
                    )
                }),
            ]
        }

        proptest! {
            #[test]
            fn prop_notification_parser_takes_any_bytes(bytes in vec(any::<u8>(), 0..64)) {
                let _ = Notification::parse(&bytes);
            }

            #[test]
            fn prop_notifications_parse_to_their_fields((want, bytes) in encoded()) {
                prop_assert_eq!(Notification::parse(&bytes), want);
                // Cut short, it is either still whole enough or "other" of
                // its own type: never another kind, never a panic.
                for cut in 0..bytes.len() {
                    let got = Notification::parse(&bytes[..cut]);
                    let kind = if cut < 2 { 0 } else { u16::from_ne_bytes([bytes[0], bytes[1]]) };
                    prop_assert!(got == want || got == Notification::Other { kind }, "{got:?}");
                }
            }
        }
    }
}
