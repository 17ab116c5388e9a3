//! Starting a controller: build the state from a store, bind the listeners,
//! spawn the accept loops. Used by the binary and by tests alike.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use airlock_store::Store;

use crate::{
    appliances::Appliances,
    auth::{self, Sessions},
    ca::{Ca, SERVER_CERT_DAYS},
    config::ControllerConfig,
    metrics::Metrics,
    policy::{self, Policies},
    releases::Releases,
    server,
    state::{system_clock, AppState},
    sync::Hub,
    tls::{self, Registry, ServerCert},
};

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// CA.
    #[error("internal CA")]
    Ca(#[from] crate::ca::CaError),
    /// TLS configuration.
    #[error("TLS")]
    Tls(#[from] tls::TlsError),
    /// Appliance records.
    #[error("appliance records")]
    Appliances(#[from] crate::appliances::ApplianceError),
    /// Keys.
    #[error("bundle-signing key")]
    Policy(#[from] policy::PolicyError),
    /// Users.
    #[error("users")]
    Auth(#[from] auth::AuthError),
    /// Configuration (the update key).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Image releases.
    #[error("image releases")]
    Releases(#[from] crate::releases::ReleaseStoreError),
    /// Binding a listener.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running controller.
#[derive(Debug)]
pub struct Started {
    /// Shared state.
    pub state: Arc<AppState>,
    /// Where the main listener is bound.
    pub main_addr: SocketAddr,
    /// Where the agent listener is bound.
    pub agent_addr: SocketAddr,
    /// Where the plain-HTTP redirect listener is bound, when configured.
    pub redirect_addr: Option<SocketAddr>,
    /// The bootstrap admin password, on the first start only.
    pub bootstrap: Option<String>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// Builds the state and serves both listeners (and the redirect one, when
/// configured) on the current tokio runtime. Port 0 binds an ephemeral port;
/// URLs then follow the bound addresses unless configured.
pub async fn start(mut cfg: ControllerConfig, store: Store) -> Result<Started, StartError> {
    let update_key = cfg.load_update_key()?;
    let main_l = bind(cfg.listen).await?;
    let agent_l = bind(cfg.agent_listen).await?;
    let main_addr =
        main_l.local_addr().map_err(|source| StartError::Bind { addr: cfg.listen, source })?;
    let agent_addr = agent_l
        .local_addr()
        .map_err(|source| StartError::Bind { addr: cfg.agent_listen, source })?;
    cfg.listen = main_addr;
    cfg.agent_listen = agent_addr;

    let now = system_clock();
    let ca = Ca::load_or_create(&store, now)?;
    // The CA certificate is public: written out for operators and scripts.
    let ca_file = cfg.data_dir.join("ca.pem");
    if let Err(e) = std::fs::write(&ca_file, ca.cert_pem()) {
        tracing::warn!(file = %ca_file.display(), error = %e, "cannot write the CA certificate file");
    }
    let names = cfg.cert_names();
    let (issued, key) = ca.issue_server(&names, now)?;
    let cert = Arc::new(ServerCert::new(vec![issued.der.clone(), ca.cert_der().clone()], key)?);
    let registry = Arc::new(Registry::default());
    let appliances = Appliances::new(store.clone());
    let enrolled = appliances.load_registry(&registry)?;
    let key = policy::signing_key(&store)?;
    let bootstrap = auth::bootstrap(&store, now)?;
    let releases = Releases::open(store.clone(), &cfg.data_dir, update_key)?;
    let state = Arc::new(AppState {
        ca,
        cert: cert.clone(),
        registry: registry.clone(),
        sessions: Sessions::new(cfg.session_idle_secs, cfg.session_absolute_secs),
        appliances,
        policies: Policies::new(store.clone(), key),
        releases,
        hub: Arc::new(Hub::default()),
        metrics: Metrics::default(),
        telemetry: Default::default(),
        public_url: cfg.public_url(),
        agent_url: cfg.agent_url(),
        clock: system_clock,
        store,
    });
    let main_tls = tls::main_config(cert.clone())?;
    let agent_tls = tls::agent_config(cert, state.ca.cert_der(), registry)?;
    tokio::spawn(server::serve_tls(main_l, main_tls, server::main_app(state.clone()), false));
    tokio::spawn(server::serve_tls(agent_l, agent_tls, server::agent_app(state.clone()), true));
    let mut redirect_addr = None;
    if let Some(a) = cfg.http_redirect_listen {
        let l = bind(a).await?;
        redirect_addr = l.local_addr().ok();
        tokio::spawn(server::serve_redirect(l, state.public_url.clone()));
    }
    tokio::spawn(renew_server_cert(state.clone(), names));
    tracing::info!(url = %state.public_url, agent_url = %state.agent_url, enrolled,
        fingerprint = %state.ca.fingerprint(), "serving");
    Ok(Started { state, main_addr, agent_addr, redirect_addr, bootstrap })
}

/// Re-issues the server certificate when a third of its life is left.
async fn renew_server_cert(state: Arc<AppState>, names: Vec<String>) {
    let life = (SERVER_CERT_DAYS * 86_400) as u64;
    let mut issued_at = system_clock();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        let now = system_clock();
        if now < issued_at + life * 2 / 3 {
            continue;
        }
        match state.ca.issue_server(&names, now) {
            Ok((issued, key)) => {
                let chain = vec![issued.der, state.ca.cert_der().clone()];
                match state.cert.replace(chain, key) {
                    Ok(()) => {
                        issued_at = now;
                        tracing::info!("server certificate renewed");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the renewed server certificate")
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot renew the server certificate"),
        }
    }
}
