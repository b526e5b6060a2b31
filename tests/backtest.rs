//! `lapse backtest` from export files (issue 17): JSON lines and an Avro object
//! container file written by the Avro library, two policies, the report in all
//! three formats, unusable records counted by reason. (That a backtest decides
//! exactly what the live pipeline decided is checked against live runs in
//! `recall.rs` and `throttle.rs`, through `Stack::backtest_matches_live`.)

mod common;

use std::time::Duration;

use chrono::TimeZone;
use common::stack::schemas_dir;
use common::*;
use serde_json::{json, Value};

const DAY: i64 = 86_400_000;

fn shanghai(y: i32, m: u32, d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(y, m, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

fn send(id: &str, customer: &str, channel: &str, at: i64) -> Value {
    json!({"type": "send", "event_id": id, "tenant_id": "brandA", "customer_id": customer,
           "occurred_at": at, "channel": channel, "message_id": format!("m-{id}"),
           "campaign_id": "spring", "purpose": "MARKETING"})
}

async fn backtest(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let proposed = dir.join("proposed.toml");
    let baseline = dir.join("baseline.toml");
    let data = dir.join("data");
    let (p, b, d) = (
        proposed.display().to_string(),
        baseline.display().to_string(),
        data.display().to_string(),
    );
    let args = [
        &["backtest", "--policy", &p, "--baseline", &b, "--from", &d][..],
        extra,
    ]
    .concat();
    let schemas = schemas_dir();
    run_lapse(
        &args,
        &[("LAPSE_SCHEMAS_DIR", &schemas)],
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test]
async fn a_tighter_sms_cap_is_compared_with_the_current_policy_from_export_files() {
    let dir = scratch_dir("backtest");
    std::fs::write(
        dir.path().join("baseline.toml"),
        "[policy.caps.SMS]\nlimit = 2\nwindow = \"7d\"\n[policy.lapse]\nholdout_share = 0.0\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("proposed.toml"),
        "[policy.caps.SMS]\nlimit = 1\nwindow = \"7d\"\n[policy.lapse]\nholdout_share = 0.0\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let t0 = shanghai(2026, 3, 2, 12);
    let mut lines = Vec::new();
    // alice: four SMS in four days (cap 2/7d blocks two, cap 1/7d three).
    for d in 0..4 {
        lines.push(send(&format!("a{d}"), "alice", "SMS", t0 + d * DAY));
    }
    // bob: one WECHAT a day, allowed under both; carol: an SMS at 23:00 (quiet hours).
    for d in 0..3 {
        lines.push(send(&format!("b{d}"), "bob", "WECHAT", t0 + d * DAY));
    }
    lines.push(send("c0", "carol", "SMS", shanghai(2026, 3, 3, 23)));
    // RFC 3339 times are read too.
    lines.push(json!({"type": "open", "event_id": "o1", "tenant_id": "brandA", "customer_id": "bob",
                      "occurred_at": "2026-03-02T05:00:00Z", "channel": "WECHAT", "message_id": "m-b0"}));
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    // Unusable records, each counted with its reason.
    text.push_str("not json\n");
    text.push_str("{\"type\": \"bogus\", \"event_id\": \"x\"}\n");
    text.push_str(&format!(
        "{}\n",
        json!({"type": "send", "event_id": "bad", "tenant_id": "brandA", "customer_id": "x",
               "occurred_at": t0, "channel": "FAX", "message_id": "m", "purpose": "MARKETING"})
    ));
    std::fs::write(data.join("engagement.jsonl"), text).unwrap();

    // dora: two LASER visits, the last in 2025: long lapsed by March 2026, so
    // her recall stages fire in the replay. Written by the Avro library itself.
    let schema_text = std::fs::read_to_string(format!("{}/visit.avsc", schemas_dir())).unwrap();
    let schema = apache_avro::Schema::parse_str(&schema_text).unwrap();
    let mut w = apache_avro::Writer::new(&schema, Vec::new());
    for (i, at) in [shanghai(2025, 9, 1, 10), shanghai(2025, 10, 1, 10)]
        .into_iter()
        .enumerate()
    {
        let mut r = apache_avro::types::Record::new(&schema).unwrap();
        r.put("event_id", format!("v{i}"));
        r.put("tenant_id", "brandA");
        r.put("customer_id", "dora");
        r.put(
            "occurred_at",
            apache_avro::types::Value::TimestampMillis(at),
        );
        r.put(
            "visit_type",
            apache_avro::types::Value::Enum(1, "TREATMENT".into()),
        );
        r.put(
            "treatment",
            apache_avro::types::Value::Union(1, Box::new("LASER".into())),
        );
        r.put("amount", 80_000i64);
        r.put("currency", "CNY");
        w.append(r).unwrap();
    }
    std::fs::write(data.join("visits.avro"), w.into_inner().unwrap()).unwrap();

    let out = backtest(dir.path(), &["--json", "--sample", "3"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["records_replayed"], 11, "{v:#}");
    assert_eq!(v["records_read"], 14);
    assert_eq!(
        v["records_unusable"],
        json!({"bad_json": 1, "missing_type": 1, "schema_mismatch": 1}),
        "{v:#}"
    );
    let policy = |i: usize| -> &Value {
        assert_eq!(v["policies"][i][0], ["baseline", "proposed"][i]);
        &v["policies"][i][1]
    };
    let (base, prop) = (policy(0), policy(1));
    let row = |p: &Value, ch: &str| -> Value {
        let rows: Vec<&Value> = p["sends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["channel"] == ch)
            .collect();
        let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
        json!({"allowed": sum("allowed"), "cap": sum("blocked_cap"), "quiet": sum("blocked_quiet_hours"),
               "cost_blocked": sum("cost_blocked")})
    };
    assert_eq!(
        row(base, "SMS"),
        json!({"allowed": 2, "cap": 2, "quiet": 1, "cost_blocked": 15})
    );
    assert_eq!(
        row(prop, "SMS"),
        json!({"allowed": 1, "cap": 3, "quiet": 1, "cost_blocked": 20})
    );
    assert_eq!(row(base, "WECHAT")["allowed"], 3);
    assert_eq!(row(prop, "WECHAT")["allowed"], 3);
    assert_eq!(base["totals"]["customers_blocked"], 2, "alice and carol");
    // dora's recall stages fired in both (same lapse policy).
    let triggers = |p: &Value| -> u64 {
        p["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["triggers"].as_u64().unwrap())
            .sum()
    };
    assert!(triggers(base) >= 1, "{base:#}");
    assert_eq!(triggers(base), triggers(prop));
    // The example customer is alice, hashed.
    let samples = v["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    let shown = samples[0][0].as_str().unwrap();
    assert!(
        shown.starts_with("brandA/#") && !shown.contains("alice"),
        "{shown}"
    );
    assert!(samples[0][1]
        .as_str()
        .unwrap()
        .contains("2 blocked under baseline, 3 under proposed"));

    // The same as a table and as CSV.
    let table = backtest(dir.path(), &["--sample", "3", "--show-ids"]).await;
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("brandA/alice: SMS: 2 blocked under baseline, 3 under proposed"),
        "{table}"
    );
    assert!(table.contains("unusable: bad_json: 1"), "{table}");
    let csv = backtest(dir.path(), &["--csv"]).await;
    assert!(csv.status.success());
    let csv = String::from_utf8(csv.stdout).unwrap();
    let mut rows = csv.lines();
    assert_eq!(
        rows.next(),
        Some("policy,channel,week,allowed,blocked_cap,blocked_throttled,blocked_suppressed,blocked_quiet_hours,blocked_cross_channel,blocked_campaign_channel,blocked_platform,customers_blocked,cost_allowed,cost_blocked")
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("proposed,SMS,2026-03-02,1,3,0,0,1,0,0,0,2,")),
        "{csv}"
    );

    // Nothing to read is an error that says so, not an empty report.
    let empty = run_lapse(
        &[
            "backtest",
            "--policy",
            &dir.path().join("proposed.toml").display().to_string(),
            "--from",
            "/nonexistent/x.jsonl",
        ],
        &[("LAPSE_SCHEMAS_DIR", &schemas_dir())],
        Duration::from_secs(30),
    )
    .await;
    let err = String::from_utf8_lossy(&empty.stderr);
    assert!(err.contains("unreadable_file"), "{err}");
}

/// Issue 16: the cross-channel rules and platform rules are backtested like
/// any policy, each blocked send counted under its own reason.
#[tokio::test]
async fn cross_channel_and_platform_rules_are_reported_under_their_own_reasons() {
    let dir = scratch_dir("backtest-cross");
    std::fs::write(
        dir.path().join("baseline.toml"),
        "[policy.lapse]\nholdout_share = 0.0\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("proposed.toml"),
        "[policy.cross_channel]\nlimit = 2\nwindow = \"1d\"\ncampaign_lock = \"7d\"\n\
         [[policy.platform_rules]]\nname = \"wecom_daily_mass_message\"\nchannel = \"WECHAT\"\nkind = \"calendar_day\"\nlimit = 1\n\
         [policy.lapse]\nholdout_share = 0.0\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let t0 = shanghai(2026, 3, 2, 12);
    let with_campaign = |id: &str, customer: &str, channel: &str, at: i64, campaign: &str| {
        let mut v = send(id, customer, channel, at);
        v["campaign_id"] = json!(campaign);
        v
    };
    let lines = [
        // eve: three campaigns on three channels; the third touch of the day is one too many.
        with_campaign("e1", "eve", "WECHAT", t0, "a"),
        with_campaign("e2", "eve", "SMS", t0 + DAY / 24, "b"),
        with_campaign("e3", "eve", "EMAIL", t0 + DAY / 12, "c"),
        // finn: WeCom's one mass message a day.
        with_campaign("f1", "finn", "WECHAT", t0, "a"),
        with_campaign("f2", "finn", "WECHAT", t0 + DAY / 24, "a"),
        // gus: campaign "spring" went out by EMAIL; SOCIAL may not carry it.
        with_campaign("g1", "gus", "EMAIL", t0, "spring"),
        with_campaign("g2", "gus", "SOCIAL", t0 + DAY / 24, "spring"),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("engagement.jsonl"), text).unwrap();
    let out = backtest(dir.path(), &["--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let totals = |i: usize| &v["policies"][i][1]["totals"];
    assert_eq!(totals(0)["blocked"], json!([0, 0, 0, 0, 0, 0, 0]), "{v:#}");
    assert_eq!(totals(0)["allowed"], 7);
    // cap, throttled, suppressed, quiet hours, cross-channel, campaign channel, platform.
    assert_eq!(totals(1)["blocked"], json!([0, 0, 0, 0, 1, 1, 1]), "{v:#}");
    assert_eq!(totals(1)["allowed"], 4);
    let rows = v["policies"][1][1]["sends"].as_array().unwrap();
    let blocked = |ch: &str, k: &str| -> u64 {
        rows.iter()
            .filter(|r| r["channel"] == ch)
            .map(|r| r[k].as_u64().unwrap())
            .sum()
    };
    assert_eq!(blocked("EMAIL", "blocked_cross_channel"), 1);
    assert_eq!(blocked("SOCIAL", "blocked_campaign_channel"), 1);
    assert_eq!(blocked("WECHAT", "blocked_platform"), 1);
}
