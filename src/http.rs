//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (Redis and broker reachable at the last probe, and no permanent
//! Redis error in force: `store::fault`).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::domain::clock::Clock;
use crate::domain::event::CustomerRef;
use crate::domain::policy::Policies;
use crate::domain::state::StateParams;
use crate::metrics::Metrics;
use crate::store::StateStore;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    /// Serves `GET /v1/allowance/TENANT/CUSTOMER` when set.
    pub allowance: Option<AllowanceApi>,
}

/// What the synchronous allowance check needs.
#[derive(Clone)]
pub struct AllowanceApi {
    pub store: StateStore,
    pub policies: Arc<Policies>,
    pub params: StateParams,
    pub clock: Arc<dyn Clock>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/allowance/{tenant}/{*customer}", get(allowance))
        .route("/v1/campaigns/{tenant}/{*campaign}", get(campaign))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if let Some(reason) = s.metrics.redis_fault.reason() {
        // Redis answers, but a step keeps failing: say why.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        );
    }
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis or the broker is unreachable\n".to_string(),
        )
    }
}

/// Every channel's allowance for one customer, evaluated now: for senders that
/// check right before sending. A customer lapse has never seen is OPEN everywhere.
async fn allowance(
    State(s): State<HttpState>,
    Path((tenant, customer)): Path<(String, String)>,
) -> Response {
    let Some(api) = s.allowance else {
        return (StatusCode::NOT_FOUND, "allowance API not enabled\n").into_response();
    };
    let c = CustomerRef::new(tenant, customer);
    if c.tenant.is_empty() || c.customer.is_empty() || c.tenant.contains(['{', '}']) {
        return (
            StatusCode::BAD_REQUEST,
            "expected /v1/allowance/TENANT/CUSTOMER\n",
        )
            .into_response();
    }
    match api.store.load(&c).await {
        Ok(loaded) => {
            let v = crate::inspect::allowance_view(
                &c,
                loaded.as_ref().map(|l| &l.state),
                api.policies.of(&c.tenant),
                &api.params,
                api.clock.now_ms(),
            );
            Json(v).into_response()
        }
        Err(e) => {
            s.metrics
                .redis_errors
                .with_label_values(&["allowance"])
                .inc();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("state store unavailable: {e}\n"),
            )
                .into_response()
        }
    }
}

/// A campaign's click rates, throttle state, sends and the sends that ignored an allowance.
async fn campaign(
    State(s): State<HttpState>,
    Path((tenant, campaign)): Path<(String, String)>,
) -> Response {
    let Some(api) = s.allowance else {
        return (StatusCode::NOT_FOUND, "campaign API not enabled\n").into_response();
    };
    match api
        .store
        .load_campaigns(&[(tenant.as_str(), campaign.as_str())])
        .await
    {
        Ok(mut v) => {
            let (rev, st) = v.pop().unwrap_or_default();
            let policy = api.policies.of(&tenant);
            let (recent, baseline) = st.rates(policy);
            let state = st.published.map_or("OPEN", |p| p.state.as_str());
            Json(serde_json::json!({
                "tenant_id": tenant,
                "campaign_id": campaign,
                "known": rev > 0,
                "state": state,
                "throttled_until": st.spell_until,
                "first_send_at": st.first_send_at,
                "sends": st.total_sends,
                "clicks": st.total_clicks,
                "violations": st.violations,
                "recent_click_rate": recent,
                "baseline_click_rate": baseline,
            }))
            .into_response()
        }
        Err(e) => {
            s.metrics
                .redis_errors
                .with_label_values(&["campaign"])
                .inc();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("state store unavailable: {e}\n"),
            )
                .into_response()
        }
    }
}

/// Serves until the listener fails; binding errors surface at start-up.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
