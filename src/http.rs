//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (start-up over, Redis, the broker and the registry reachable at
//! the last probe, and no permanent Redis error in force: `store::fault`),
//! served from the first second of `lapse run` whatever is unreachable.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use std::sync::{Arc, OnceLock};

use crate::domain::clock::Clock;
use crate::domain::event::CustomerRef;
use crate::domain::policy::Policies;
use crate::domain::state::StateParams;
use crate::metrics::Metrics;
use crate::store::StateStore;

#[derive(Clone)]
pub struct HttpState {
    /// Also holds what keeps lapse from being ready (`metrics.redis_fault`).
    pub metrics: Metrics,
    /// Serves `GET /v1/allowance/TENANT/CUSTOMER` once set (after start-up).
    pub allowance: Arc<OnceLock<AllowanceApi>>,
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

/// 200 `{"ready": true}`, or 503 with what is not ready and why:
/// `{"ready": false, "not_ready": {"redis": "...", "broker": "...", "registry": "..."}}`
/// (only the components not ready; reasons are scrubbed of secrets).
async fn readyz(State(s): State<HttpState>) -> Response {
    let not_ready = s.metrics.redis_fault.by_component();
    if not_ready.is_empty() {
        return Json(serde_json::json!({ "ready": true })).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "ready": false, "not_ready": not_ready })),
    )
        .into_response()
}

/// Before start-up is over the store is not connected yet.
fn starting() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "starting: not connected to Redis yet (see /readyz)\n",
    )
        .into_response()
}

/// `?campaign=X`: answer for that campaign (one campaign, one channel).
#[derive(serde::Deserialize)]
struct AllowanceQuery {
    campaign: Option<String>,
}

/// Every channel's allowance for one customer, evaluated now: for senders that
/// check right before sending. A customer lapse has never seen is OPEN everywhere.
async fn allowance(
    State(s): State<HttpState>,
    Path((tenant, customer)): Path<(String, String)>,
    Query(q): Query<AllowanceQuery>,
) -> Response {
    let Some(api) = s.allowance.get() else {
        return starting();
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
            let now = api.clock.now_ms();
            let state = loaded.as_ref().map(|l| &l.state);
            // The customer's policy now: their arms' overrides included.
            let eff = api.policies.effective(&c, now);
            let mut v = crate::inspect::campaign_allowance_view(
                &c,
                state,
                &eff.policy,
                &api.params,
                now,
                q.campaign.as_deref().filter(|k| !k.is_empty()),
            );
            crate::inspect::add_experiments(&mut v, &c, state, api.policies.experiments(), now);
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
    let Some(api) = s.allowance.get() else {
        return starting();
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
