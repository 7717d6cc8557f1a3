//! The running service: [`Application::build`] opens the store, loads the demo seed if configured, binds the
//! listener and starts the workers (a scheduled sync per directory that has an interval, the outbox workers that
//! deliver to partners);
//! [`Application::run_until_stopped`] serves until the shutdown signal, then stops the workers and the directory
//! syncs running, lets requests in flight finish (up to the grace period) and closes the database.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use time::OffsetDateTime;
use tokio::net::TcpListener;

use std::collections::HashMap;

use crate::config::Settings;
use crate::directories::jobs::SyncRunner;
use crate::directories::{self, schedule};
use crate::followup::subscription::{Hook, Wakes};
use crate::http::public_url::PublicUrl;
use crate::http::serve::{self, ConnectionLimits};
use crate::http::{self, AppState, Limits};
use crate::intake::{self, SeedError};
use crate::keys::KeyRing;
use crate::mapping::Mappings;
use crate::partners::Partners;
use crate::policy::Policy;
use crate::store::{self, Store, StoreError};
use crate::telemetry;
use crate::tls::ServerTls;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened or migrated.
    #[error("cannot open the database: {0}")]
    Database(#[source] StoreError),
    /// The seed directory could not be loaded.
    #[error("cannot load the seed records: {0}")]
    Seed(#[from] SeedError),
    /// The mapping files have errors.
    #[error("the mapping files have errors:\n{0}")]
    Mappings(#[source] crate::mapping::LoadErrors),
    /// A partner names an overlay the mappings do not have.
    #[error("the partners do not fit the mappings:\n{}", .0.join("\n"))]
    Partners(Vec<String>),
    /// A directory source could not be set up.
    #[error("cannot set up a directory source: {0}")]
    Directory(#[source] directories::SourceError),
    /// The directory search index could not be set up.
    #[error("cannot set up the directory search index: {0}")]
    SearchIndex(#[source] StoreError),
    /// The listener's TLS files could not be used.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A built service, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
    store: Arc<dyn Store>,
    limits: ConnectionLimits,
    /// Turns `true` at shutdown: the workers and the directory syncs watch it.
    stop: tokio::sync::watch::Sender<bool>,
    workers: tokio::task::JoinSet<()>,
    syncs: SyncRunner,
    search: crate::directories::index::ServiceSearch,
    /// The listener's TLS, when it speaks TLS.
    tls: Option<Arc<ServerTls>>,
}

impl Application {
    /// The listener's TLS, when it speaks TLS (to reload it, as SIGHUP does).
    #[must_use]
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// How the gateway searches its directory catalog (to wait for the index's first build).
    #[must_use]
    pub fn search(&self) -> crate::directories::index::ServiceSearch {
        self.search.clone()
    }

    /// Opens the store, loads the seed, builds the router and binds the listener.
    ///
    /// # Errors
    /// When the database, the seed or the address fails.
    pub async fn build(settings: &Settings) -> Result<Self, StartError> {
        // One TLS provider for every client in the process (sqlx to PostgreSQL today); a second call is a no-op.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store =
            store::connect(&settings.database.url, settings.database.max_connections, settings.acquire_timeout())
                .await
                .map_err(StartError::Database)?;
        let partners = Arc::new(Partners::new(&settings.partners));
        if let Some(dir) = &settings.seed.dir {
            let report = intake::seed(&*store, &partners, dir, OffsetDateTime::now_utc()).await?;
            tracing::info!(created = report.created, kept = report.kept, "Seed records loaded.");
        }
        let mappings = Arc::new(Mappings::load(&settings.mappings.dir).map_err(StartError::Mappings)?);
        let policy = Arc::new(Policy::load(&settings.mappings.dir).map_err(StartError::Mappings)?);
        let mut missing = partners.missing_overlays(&mappings);
        missing.extend(policy.missing_profiles(&partners));
        if !missing.is_empty() {
            return Err(StartError::Partners(missing));
        }
        let mut sources = HashMap::new();
        let mut schedules = Vec::new();
        for d in &settings.directories {
            let source = directories::source_from_settings(d, &settings.mappings.dir).map_err(StartError::Directory)?;
            if d.sync_interval_secs() > 0 {
                schedules.push((d.name().to_owned(), Duration::from_secs(d.sync_interval_secs())));
            }
            sources.insert(d.name().to_owned(), source);
        }
        let sources = Arc::new(sources);
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let syncs = SyncRunner::new(store.clone(), sources.clone(), stopping.clone());
        let mut workers = tokio::task::JoinSet::new();
        for (name, interval) in schedules {
            workers.spawn(schedule::run_worker(syncs.clone(), name, interval, stopping.clone()));
        }
        // PostgreSQL: entries are appended unsealed and sealed in rounds (see store/audit.rs); every replica runs a
        // sealer, one at a time holds the chain's lock.
        if store.backend() == "postgres" {
            workers.spawn(seal_audit(store.clone(), stopping.clone()));
        }
        let mut wakes = Arc::new(Wakes::default());
        if settings.outbox.enabled && partners.iter().next().is_some() {
            let worker = crate::outbox::Worker::new(store.clone(), mappings.clone(), &partners, &settings.outbox)
                .map_err(|e| StartError::Partners(vec![e]))?;
            workers.spawn(worker.run(stopping.clone()));
            // What was sent is followed on the partners' servers (each partner that receives referrals and is
            // polled).
            let poller = crate::followup::poll::Poller::new(
                store.clone(),
                mappings.clone(),
                partners.clone(),
                Duration::from_secs(settings.outbox.timeout_secs),
            )
            .map_err(|e| StartError::Partners(vec![e]))?;
            if poller.followed().next().is_some() {
                wakes = Arc::new(Wakes::new(poller.followed()));
                let poller = poller.with_subscriptions(wakes.clone(), settings.server.public_base_url.clone());
                workers.spawn(poller.run(stopping.clone()));
            }
        }
        let tls = match &settings.server.tls {
            Some(t) => Some(Arc::new(ServerTls::load(t.files()).map_err(StartError::Tls)?)),
            None => None,
        };
        let addr = settings.listen_addr();
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        let public_url = PublicUrl::new(
            settings.server.public_base_url.as_deref(),
            bound,
            tls.is_some(),
            settings.server.trusted_networks(),
        );
        let search = match settings.search.engine {
            crate::config::SearchEngine::Index => {
                let search = crate::directories::index::ServiceSearch::indexed(
                    crate::directories::index::ServiceIndex::new().map_err(StartError::SearchIndex)?,
                );
                workers.spawn(search.clone().build(store.clone(), stopping.clone()));
                search
            }
            crate::config::SearchEngine::Sql => crate::directories::index::ServiceSearch::sql(),
        };
        let state = AppState {
            store: store.clone(),
            api: settings.api.clone(),
            metrics: telemetry::metrics_handle(),
            sources,
            syncs: syncs.clone(),
            mappings,
            mapping_slots: Arc::new(tokio::sync::Semaphore::new(http::mapping_slots())),
            public_url: Arc::new(public_url),
            partners,
            policy,
            search: search.clone(),
            hook: Arc::new(Hook::new(store.clone(), wakes)),
        };
        let certified =
            settings.partners.iter().filter_map(|p| p.client_cert_name.clone().map(|n| (p.name.clone(), n))).collect();
        let keys = Arc::new(KeyRing::from_settings(&settings.api_keys).with_certified_partners(certified));
        if settings.api_keys.is_empty() {
            tracing::warn!("No API keys are configured; every /api/v1 call will be refused.");
        }
        let router = http::router(state, keys, Limits::from_settings(settings));
        Ok(Application {
            listener,
            router,
            store,
            limits: ConnectionLimits::from_settings(settings),
            stop,
            workers,
            syncs,
            search,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; then stops the workers and the directory syncs running (each records
    /// that it stopped and gives its lease back), gives requests in flight up to the grace period, and closes the
    /// store.
    ///
    /// # Errors
    /// None today (a failed accept is logged and retried); kept so a caller handles a future listener failure.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let Application { listener, router, store, limits, stop, mut workers, syncs, search: _, tls } = self;
        if let Some(tls) = &tls {
            workers.spawn(reload_on_hangup(tls.clone(), stop.subscribe()));
        }
        let shutdown = async move {
            shutdown.await;
            // Syncs are not requests: they stop at once rather than hold the grace period.
            let _ = stop.send(true);
        };
        serve::serve(listener, router, limits, tls, shutdown).await;
        while workers.join_next().await.is_some() {}
        syncs.wait_for_background().await;
        store.close().await;
        tracing::info!("Stopped.");
        Ok(())
    }
}

/// How often a replica seals the audit entries committed since (PostgreSQL).
const SEAL_EVERY: Duration = Duration::from_millis(200);

/// Seals the audit chain's new entries every [`SEAL_EVERY`] until the gateway stops, then once more.
async fn seal_audit(store: Arc<dyn Store>, mut stopping: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => break,
            () = tokio::time::sleep(SEAL_EVERY) => {}
        }
        if let Err(e) = store.seal_pending().await {
            tracing::warn!(error = %e, "Audit entries not sealed this round; the next round takes them.");
        }
    }
    if let Err(e) = store.seal_pending().await {
        tracing::warn!(error = %e, "Audit entries not sealed at stop; the next start seals them.");
    }
}

/// Reads the listener's TLS files again on each SIGHUP until the gateway stops; a file that cannot be used is
/// logged and the certificate in use stays.
async fn reload_on_hangup(tls: Arc<ServerTls>, mut stopping: tokio::sync::watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be caught; TLS certificates are read at start only.");
            return;
        };
        loop {
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match tls.reload() {
                        Ok(()) => tracing::info!("TLS certificates reloaded; new handshakes use them."),
                        Err(e) => tracing::error!(error = %e, "TLS certificates not reloaded; the ones in use stay."),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, stopping.wait_for(|stop| *stop).await);
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
