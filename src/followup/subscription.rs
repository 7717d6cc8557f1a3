//! Topic-based Subscriptions at partners (FHIR R4 backport of R5 Subscriptions, rest-hook, `id-only`): the
//! Subscription the gateway asks a partner for, the notifications the partner sends back, and how they are kept.
//!
//! A notification names the Tasks that changed (by id only); the gateway keeps those ids before it answers (a crash
//! loses none) and the follow-up worker reads each Task and applies it exactly as a sweep would. Notifications are
//! numbered: a number skipped, a heartbeat counting more events than arrived, or an `error` status means some were
//! missed, and the next round sweeps the partner (`_lastUpdated`), which finds whatever they were about. Heartbeats
//! prove the channel is alive: two periods without a word from the partner and the subscription is no longer
//! trusted (sweeps resume at `poll_secs`, and the subscription is checked and asked for again).
//!
//! The partner proves it is the one subscribed with the bearer token the gateway put in the Subscription's
//! `channel.header`; the gateway keeps only the token's SHA-256.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::partners::SubscriptionSettings;
use crate::store::{Notified, NotifiedOutcome, Store, StoreError};

/// The backport IG's extensions and profiles.
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// The path partners send notifications to, under the gateway's public base URL.
pub const NOTIFY_PATH: &str = "/fhir/subscription-notifications";

/// How long a partner may go without sending anything before the subscription is not trusted: this many heartbeat
/// periods.
pub const LATE_AFTER_HEARTBEATS: u32 = 2;

/// A bearer token for one subscription: the secret goes to the partner, the hash stays here.
pub struct Token {
    /// What the partner sends back (`Authorization: Bearer …`).
    pub secret: String,
    /// Its SHA-256, hex.
    pub hash: String,
}

impl Token {
    /// A new random token (256 bits).
    ///
    /// # Errors
    /// When the system has no randomness to give.
    pub fn new() -> Result<Token, String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a subscription token: {e}"))?;
        let secret = hex::encode(bytes);
        Ok(Token { hash: hash(&secret), secret })
    }
}

/// The SHA-256 of a token, hex.
#[must_use]
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Where `partner` sends its notifications: `<public base>/fhir/subscription-notifications/<partner>`.
#[must_use]
pub fn endpoint(public_base_url: &str, partner: &str) -> String {
    format!("{}{NOTIFY_PATH}/{partner}", public_base_url.trim_end_matches('/'))
}

/// The Subscription asked of a partner: the topic (and filter) configured, rest-hook to `endpoint` with the token
/// as a header, `id-only` payloads, a heartbeat every `heartbeat_secs`.
#[must_use]
pub fn resource(settings: &SubscriptionSettings, endpoint: &str, token: &str) -> Value {
    let mut subscription = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription")]},
        "status": "requested",
        "reason": "Follow the referrals the agency sent (Task status changes)",
        "criteria": settings.topic,
        "channel": {
            "extension": [
                {"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": settings.heartbeat_secs},
                {"url": format!("{BACKPORT}/backport-timeout"), "valueUnsignedInt": 30},
                {"url": format!("{BACKPORT}/backport-max-count"), "valuePositiveInt": 50}
            ],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "id-only"}]},
            "header": [format!("Authorization: Bearer {token}")]
        }
    });
    if let Some(filter) = &settings.filter {
        subscription["_criteria"] =
            json!({"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": filter}]});
    }
    subscription
}

/// Reads a notification Bundle (`type = history`, first entry the `Parameters` of the subscription status): its
/// type, status, event count and the Tasks its events name (other resources are counted, not followed).
///
/// # Errors
/// What makes it no notification, in words for the sender.
pub fn parse(bundle: &Value) -> Result<Notified, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("a notification is a Bundle".into());
    }
    if bundle.get("type").and_then(Value::as_str) != Some("history") {
        return Err("a notification Bundle has type `history`".into());
    }
    let status = bundle
        .pointer("/entry/0/resource")
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Parameters"))
        .ok_or("the first entry of a notification is the subscription status (Parameters)")?;
    let params = status.get("parameter").and_then(Value::as_array).ok_or("the subscription status has no parameter")?;
    let named = |name: &'static str| params.iter().filter(move |p| p.get("name").and_then(Value::as_str) == Some(name));
    let code =
        |name: &'static str| named(name).find_map(|p| p.get("valueCode").and_then(Value::as_str)).map(str::to_owned);
    let kind = code("type").ok_or("the subscription status has no `type`")?;
    if !matches!(kind.as_str(), "handshake" | "heartbeat" | "event-notification" | "query-status" | "query-event") {
        return Err(format!("`{kind}` is not a notification type"));
    }
    let status_code = code("status").ok_or("the subscription status has no `status`")?;
    let events_since = match named("events-since-subscription-start").find_map(|p| p.get("valueString")) {
        None => None,
        Some(v) => Some(count(v).ok_or("events-since-subscription-start is not a count")?),
    };
    let mut events = Vec::new();
    for event in named("notification-event") {
        let parts = event.get("part").and_then(Value::as_array).ok_or("a notification-event has no part")?;
        let part = |name: &str| parts.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name));
        let number = part("event-number")
            .and_then(|p| p.get("valueString"))
            .and_then(count)
            .ok_or("a notification-event has no event-number")?;
        let focus = part("focus").and_then(|p| p.pointer("/valueReference/reference")).and_then(Value::as_str);
        if let Some(id) = focus.and_then(task_id) {
            events.push((number, id.to_owned()));
        } else {
            // Counted (the numbers tell gaps), but nothing here for the gateway to read.
            events.push((number, String::new()));
        }
    }
    Ok(Notified { kind, status: status_code, events_since, events })
}

fn count(v: &Value) -> Option<i64> {
    v.as_str().and_then(|s| s.trim().parse::<i64>().ok()).filter(|n| *n >= 0)
}

/// The Task id a focus reference names (`Task/1`, `https://ehr/fhir/Task/1`, `Task/1/_history/3`).
fn task_id(reference: &str) -> Option<&str> {
    let path = reference.split(['?', '#']).next()?;
    let parts: Vec<&str> = path.split('/').collect();
    let at = parts.iter().rposition(|p| *p == "Task")?;
    parts.get(at + 1).copied().filter(|id| crate::mapping::is_fhir_id(id))
}

/// Wakes the follow-up worker of a partner when a notification came in.
#[derive(Default)]
pub struct Wakes {
    by_partner: HashMap<String, Arc<tokio::sync::Notify>>,
}

impl Wakes {
    /// One wake per partner named.
    #[must_use]
    pub fn new<'a>(partners: impl IntoIterator<Item = &'a str>) -> Wakes {
        Wakes { by_partner: partners.into_iter().map(|p| (p.to_owned(), Arc::default())).collect() }
    }

    /// The partner's wake, if it is followed here.
    #[must_use]
    pub fn of(&self, partner: &str) -> Option<Arc<tokio::sync::Notify>> {
        self.by_partner.get(partner).cloned()
    }
}

/// What a notification could not be.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No token, or not the token of this partner's subscription.
    #[error("no subscription of this partner sends with these credentials")]
    Unauthorized,
    /// Not a notification.
    #[error("{0}")]
    Invalid(String),
    /// Ours.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Receives partners' notifications (the route `POST /fhir/subscription-notifications/{partner}`).
pub struct Hook {
    store: Arc<dyn Store>,
    wakes: Arc<Wakes>,
}

impl Hook {
    /// A hook that keeps notifications in `store` and wakes the partner's worker.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, wakes: Arc<Wakes>) -> Hook {
        Hook { store, wakes }
    }

    /// Keeps one notification from `partner`, sent with `Authorization: <authorization>`, then wakes its worker.
    ///
    /// # Errors
    /// `Unauthorized` before anything is read; `Invalid` for a body that is no notification; `Store`.
    pub async fn receive(
        &self,
        partner: &str,
        authorization: Option<&str>,
        body: &Value,
        now: OffsetDateTime,
    ) -> Result<Notified, HookError> {
        let secret = authorization
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(HookError::Unauthorized)?;
        let notified = parse(body).map_err(HookError::Invalid)?;
        match self.store.record_notification(partner, &hash(secret), &notified, now).await? {
            NotifiedOutcome::Unknown => return Err(HookError::Unauthorized),
            NotifiedOutcome::Recorded { gap } => {
                tracing::info!(partner, kind = %notified.kind, status = %notified.status,
                    events = notified.events.len(), gap, "Subscription notification kept.");
            }
        }
        if let Some(wake) = self.wakes.of(partner) {
            wake.notify_one();
        }
        Ok(notified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(kind: &str, since: &str, events: &[(&str, &str)]) -> Value {
        let mut parameter = vec![
            json!({"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/s1"}}),
            json!({"name": "topic", "valueCanonical": "https://ehr.example/SubscriptionTopic/task"}),
            json!({"name": "status", "valueCode": "active"}),
            json!({"name": "type", "valueCode": kind}),
            json!({"name": "events-since-subscription-start", "valueString": since}),
        ];
        for (n, focus) in events {
            parameter.push(json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": n},
                {"name": "focus", "valueReference": {"reference": focus}}
            ]}));
        }
        json!({"resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": "urn:uuid:0b0b8c2c-9d1e-4b43-9f59-3c1b0f4a1e11",
             "resource": {"resourceType": "Parameters", "parameter": parameter}}
        ]})
    }

    #[test]
    fn a_notification_gives_its_type_count_and_the_tasks_it_names() {
        let n = parse(&notification(
            "event-notification",
            "4",
            &[("3", "https://ehr.example/fhir/Task/t-1/_history/2"), ("4", "Encounter/9"), ("5", "Task/t-2")],
        ))
        .expect("parses");
        assert_eq!(n.kind, "event-notification");
        assert_eq!(n.events_since, Some(4));
        assert_eq!(n.events, vec![(3, "t-1".to_owned()), (4, String::new()), (5, "t-2".to_owned())]);
    }

    #[test]
    fn what_is_no_notification_is_named() {
        assert!(parse(&json!({"resourceType": "Task"})).unwrap_err().contains("Bundle"));
        let mut batch = notification("heartbeat", "1", &[]);
        batch["type"] = json!("batch");
        assert!(parse(&batch).unwrap_err().contains("history"));
        let odd = notification("wave", "1", &[]);
        assert!(parse(&odd).unwrap_err().contains("wave"));
        let negative = notification("heartbeat", "-1", &[]);
        assert!(parse(&negative).unwrap_err().contains("count"));
    }

    #[test]
    fn the_subscription_asks_for_id_only_rest_hook_with_the_token_and_filter() {
        let settings = SubscriptionSettings {
            topic: "https://ehr.example/SubscriptionTopic/task".into(),
            filter: Some("Task?requester=Organization/agency".into()),
            heartbeat_secs: 120,
        };
        let s = resource(&settings, &endpoint("https://gw.example/", "st-marys"), "secret");
        assert_eq!(s["channel"]["endpoint"], "https://gw.example/fhir/subscription-notifications/st-marys");
        assert_eq!(s["channel"]["header"][0], "Authorization: Bearer secret");
        assert_eq!(s["channel"]["_payload"]["extension"][0]["valueCode"], "id-only");
        assert_eq!(s["_criteria"]["extension"][0]["valueString"], "Task?requester=Organization/agency");
        assert_eq!(s["channel"]["extension"][0]["valueUnsignedInt"], 120);
    }

    #[test]
    fn tokens_are_random_and_kept_only_as_their_hash() {
        let a = Token::new().expect("token");
        let b = Token::new().expect("token");
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert_ne!(a.hash, a.secret);
    }
}
