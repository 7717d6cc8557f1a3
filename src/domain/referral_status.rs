//! Where a referral stands, and who may move it where: the closed-loop state machine (Gravity SDOH Clinical Care,
//! DESIGN §2), one rule for both directions and every entry path (the internal API, a partner on `/fhir`, a Task
//! read back from a partner's server).
//!
//! A referral has two sides: the **requester** asks for the service, the **performer** provides it. The
//! requester sets `draft`, `sent` and `entered_in_error`; the performer `accepted`, `declined`, `in_progress`,
//! `on_hold`, `failed` and `completed`; either may cancel. Who is on which side depends on the referral: for an
//! outbound referral to a partner the agency is the requester and the partner the performer; for an inbound one
//! (a hospital referring to the agency) the other way round; a community program found in a directory has no
//! system of its own, so the case manager records its answers (the agency holds both sides).

use super::values::vocabulary;

vocabulary! {
    /// Where a referral stands: `draft`, `sent`, `accepted`, `declined`, `in_progress`, `on_hold`,
    /// `completed`, `cancelled`, `failed`, `entered_in_error`. `declined`, `cancelled`, `on_hold` and `failed`
    /// need a reason.
    pub enum ReferralStatus {
        Draft = "draft",
        Sent = "sent",
        Accepted = "accepted",
        Declined = "declined",
        InProgress = "in_progress",
        OnHold = "on_hold",
        Completed = "completed",
        Cancelled = "cancelled",
        Failed = "failed",
        EnteredInError = "entered_in_error",
    }
}

/// A side of a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Who asks for the service (and owns the request: what is asked, for whom, of whom).
    Requester,
    /// Who provides it (and owns where it stands: accepted, in progress, done).
    Performer,
}

impl Side {
    /// `requester` or `performer`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Requester => "requester",
            Side::Performer => "performer",
        }
    }
}

/// Which sides of a status may set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetBy {
    /// Only this side.
    Only(Side),
    /// Either side (`cancelled`).
    Either,
}

impl SetBy {
    /// Whether one holding `sides` may set the status.
    #[must_use]
    pub fn allows(self, sides: &[Side]) -> bool {
        match self {
            SetBy::Only(side) => sides.contains(&side),
            SetBy::Either => !sides.is_empty(),
        }
    }
}

/// Why a status move is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IllegalMove {
    /// The state machine has no such edge.
    #[error("a referral that is {from} cannot become {to}")]
    NoSuchMove {
        /// Where the referral stands.
        from: ReferralStatus,
        /// Where the move would take it.
        to: ReferralStatus,
        /// The statuses the mover may set from here.
        allowed: Vec<ReferralStatus>,
    },
    /// The edge exists, but belongs to the other side.
    #[error("{to} is set by the referral's {}", owner.as_str())]
    NotYourSide {
        /// Where the referral stands.
        from: ReferralStatus,
        /// Where the move would take it.
        to: ReferralStatus,
        /// The side that sets `to`.
        owner: Side,
        /// The statuses the mover may set from here.
        allowed: Vec<ReferralStatus>,
    },
    /// A partner's referral whose client is not settled yet (several of the agency's clients matched): the agency
    /// links it before it takes it on.
    #[error("the referral waits to be linked to a client")]
    Unlinked {
        /// Where the move would take it.
        to: ReferralStatus,
        /// The statuses the agency may set meanwhile.
        allowed: Vec<ReferralStatus>,
    },
}

impl IllegalMove {
    /// The statuses the mover may set from where the referral stands.
    #[must_use]
    pub fn allowed(&self) -> &[ReferralStatus] {
        match self {
            IllegalMove::NoSuchMove { allowed, .. }
            | IllegalMove::NotYourSide { allowed, .. }
            | IllegalMove::Unlinked { allowed, .. } => allowed,
        }
    }

    /// One sentence for the caller: what was refused and what is allowed instead, in the agency's codes.
    #[must_use]
    pub fn explain(&self) -> String {
        self.explain_in(|s| s.as_str().to_owned())
    }

    /// The same sentence with each status written by `name` (a FHIR caller reads Task codes: `in-progress`,
    /// `rejected`).
    #[must_use]
    pub fn explain_in(&self, name: impl Fn(ReferralStatus) -> String) -> String {
        let list = |all: &[ReferralStatus]| {
            if all.is_empty() { "none".to_owned() } else { all.iter().map(|s| name(*s)).collect::<Vec<_>>().join(", ") }
        };
        match self {
            IllegalMove::NoSuchMove { from, to, allowed } => {
                let (from, to) = (name(*from), name(*to));
                format!("a referral that is {from} cannot become {to}; from {from} you may set: {}", list(allowed))
            }
            IllegalMove::NotYourSide { from, to, owner, allowed } => format!(
                "{} is set by the referral's {}, not by you; from {} you may set: {}",
                name(*to),
                owner.as_str(),
                name(*from),
                list(allowed)
            ),
            IllegalMove::Unlinked { to, allowed } => format!(
                "the referral cannot become {} before it is linked to a client (POST \
                 /api/v1/referrals/{{id}}/link, one of client_candidates); meanwhile you may set: {}",
                name(*to),
                list(allowed)
            ),
        }
    }
}

impl ReferralStatus {
    /// Whether moving to this status must say why (FHIR `Task.statusReason`).
    #[must_use]
    pub fn needs_reason(self) -> bool {
        matches!(self, Self::Declined | Self::Cancelled | Self::OnHold | Self::Failed)
    }

    /// Whether the referral has ended in this status (its crisis alert, if any, is then closed).
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Declined | Self::Failed | Self::EnteredInError)
    }

    /// Whether a referral may begin in this status (`PUT` creates only drafts and sent referrals: every later
    /// status is the performer's word, which comes through the state machine).
    #[must_use]
    pub fn may_begin(self) -> bool {
        matches!(self, Self::Draft | Self::Sent)
    }

    /// The statuses this one leads to (DESIGN §2): draft → sent; sent → accepted | declined | cancelled;
    /// accepted → in_progress | on_hold | cancelled | completed | failed; in_progress → completed | failed |
    /// cancelled | on_hold; on_hold → in_progress | cancelled | completed | failed; any → entered_in_error.
    #[must_use]
    pub fn next(self) -> &'static [ReferralStatus] {
        use ReferralStatus::{
            Accepted, Cancelled, Completed, Declined, Draft, EnteredInError, Failed, InProgress, OnHold, Sent,
        };
        match self {
            Draft => &[Sent, EnteredInError],
            Sent => &[Accepted, Declined, Cancelled, EnteredInError],
            Accepted => &[InProgress, OnHold, Cancelled, Completed, Failed, EnteredInError],
            InProgress => &[Completed, Failed, Cancelled, OnHold, EnteredInError],
            OnHold => &[InProgress, Cancelled, Completed, Failed, EnteredInError],
            Completed | Declined | Cancelled | Failed => &[EnteredInError],
            EnteredInError => &[],
        }
    }

    /// Which side sets this status.
    #[must_use]
    pub fn set_by(self) -> SetBy {
        match self {
            Self::Draft | Self::Sent | Self::EnteredInError => SetBy::Only(Side::Requester),
            Self::Cancelled => SetBy::Either,
            Self::Accepted | Self::Declined | Self::InProgress | Self::OnHold | Self::Failed | Self::Completed => {
                SetBy::Only(Side::Performer)
            }
        }
    }

    /// The statuses one holding `sides` may set from this one.
    #[must_use]
    pub fn next_for(self, sides: &[Side]) -> Vec<ReferralStatus> {
        self.next().iter().copied().filter(|s| s.set_by().allows(sides)).collect()
    }

    /// Checks a move to `to` by one holding `sides`. Staying in the same status (a new reason for `on_hold`) is
    /// allowed to the side that sets it.
    ///
    /// # Errors
    /// [`IllegalMove`] naming the statuses allowed instead.
    pub fn check_move(self, to: ReferralStatus, sides: &[Side]) -> Result<(), IllegalMove> {
        let allowed = self.next_for(sides);
        let is_edge = to == self || self.next().contains(&to);
        if !is_edge {
            return Err(IllegalMove::NoSuchMove { from: self, to, allowed });
        }
        match to.set_by() {
            by if by.allows(sides) => Ok(()),
            SetBy::Only(owner) => Err(IllegalMove::NotYourSide { from: self, to, owner, allowed }),
            SetBy::Either => Err(IllegalMove::NoSuchMove { from: self, to, allowed }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReferralStatus::*;

    const BOTH: &[Side] = &[Side::Requester, Side::Performer];

    /// The edges of DESIGN §2, written out once more by hand so that a change to [`ReferralStatus::next`] has to
    /// be made twice.
    const LEGAL: &[(ReferralStatus, ReferralStatus)] = &[
        (Draft, Sent),
        (Sent, Accepted),
        (Sent, Declined),
        (Sent, Cancelled),
        (Accepted, InProgress),
        (Accepted, OnHold),
        (Accepted, Cancelled),
        (Accepted, Completed),
        (Accepted, Failed),
        (InProgress, Completed),
        (InProgress, Failed),
        (InProgress, Cancelled),
        (InProgress, OnHold),
        (OnHold, InProgress),
        (OnHold, Cancelled),
        (OnHold, Completed),
        (OnHold, Failed),
    ];

    fn legal(from: ReferralStatus, to: ReferralStatus) -> bool {
        LEGAL.contains(&(from, to)) || (to == EnteredInError && from != EnteredInError)
    }

    #[test]
    fn every_pair_of_statuses_is_legal_exactly_as_the_design_says_for_either_side() {
        for &from in ReferralStatus::ALL {
            for &to in ReferralStatus::ALL {
                if from == to {
                    continue;
                }
                for sides in [&[Side::Requester][..], &[Side::Performer][..]] {
                    let expected = legal(from, to) && to.set_by().allows(sides);
                    assert_eq!(from.check_move(to, sides).is_ok(), expected, "{from} → {to} by {sides:?}");
                }
                assert_eq!(from.check_move(to, BOTH).is_ok(), legal(from, to), "{from} → {to} by both");
            }
        }
    }

    #[test]
    fn the_requester_sets_draft_sent_and_entered_in_error_the_performer_the_rest_either_cancels() {
        for s in [Draft, Sent, EnteredInError] {
            assert_eq!(s.set_by(), SetBy::Only(Side::Requester), "{s}");
        }
        for s in [Accepted, Declined, InProgress, OnHold, Failed, Completed] {
            assert_eq!(s.set_by(), SetBy::Only(Side::Performer), "{s}");
        }
        assert_eq!(Cancelled.set_by(), SetBy::Either);
    }

    #[test]
    fn a_refused_move_names_what_the_mover_may_do_instead() {
        let e = Sent.check_move(Completed, &[Side::Requester]).expect_err("not an edge");
        assert_eq!(e.allowed(), &[Cancelled, EnteredInError]);
        assert!(e.explain().contains("cancelled, entered_in_error"), "{}", e.explain());
        let e = Sent.check_move(Accepted, &[Side::Requester]).expect_err("the performer's");
        assert!(matches!(e, IllegalMove::NotYourSide { owner: Side::Performer, .. }));
        assert!(e.explain().contains("performer"), "{}", e.explain());
        let e = EnteredInError.check_move(Sent, BOTH).expect_err("the end");
        assert!(e.explain().ends_with("none"), "{}", e.explain());
    }

    #[test]
    fn staying_put_is_allowed_to_the_side_that_sets_the_status() {
        assert!(OnHold.check_move(OnHold, &[Side::Performer]).is_ok());
        assert!(OnHold.check_move(OnHold, &[Side::Requester]).is_err());
        assert!(Cancelled.check_move(Cancelled, &[Side::Requester]).is_ok());
    }

    #[test]
    fn only_drafts_and_sent_referrals_may_begin() {
        let begin: Vec<_> = ReferralStatus::ALL.iter().copied().filter(|s| s.may_begin()).collect();
        assert_eq!(begin, vec![Draft, Sent]);
    }
}
