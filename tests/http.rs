//! The HTTP listener: probes and Prometheus metrics, guarded by an admin token when tokens are configured.

mod common;

use broker::config::{Role, TokenConfig};
use broker_client::proto::{Lease, TaskSpec, Value};
use common::{http_request as request, TestServer};

/// A GET, with a bearer token if given; returns (status, body).
fn get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let (status, _, body) = request(addr, "GET", path, &auth, "");
    (status, body)
}

async fn with_http(tokens: Vec<TokenConfig>) -> TestServer {
    TestServer::start_with(
        move |config| {
            config.http_listen = Some("127.0.0.1:0".into());
            config.tokens = tokens;
        },
        false,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_metrics() {
    let server = with_http(Vec::new()).await;
    let http = server.handle.as_ref().unwrap().http_addr().expect("an HTTP listener");
    let client = server.client().await;
    client.enqueue(TaskSpec::new("report")).await.unwrap();
    client.enqueue(TaskSpec::new("report")).await.unwrap();
    let lease = Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let task = client.lease(&lease).await.unwrap().pop().unwrap();
    client.ack(&task.id, task.lease_id, Value::from(1)).await.unwrap();

    let (status, text) = tokio::task::spawn_blocking(move || {
        assert_eq!(get(http, "/healthz", None), (200, "ok\n".into()));
        assert_eq!(get(http, "/readyz", None), (200, "ready\n".into()));
        // Another site's name for this address (DNS rebinding), and another site's form, are refused.
        assert_eq!(request(http, "GET", "/", "Host: evil.example:7421\r\n", "").0, 403);
        assert_eq!(request(http, "GET", "/metrics", "Host: evil.example:7421\r\n", "").0, 403);
        let form = "Content-Type: application/x-www-form-urlencoded\r\nOrigin: http://evil.example\r\n";
        assert_eq!(request(http, "POST", "/dead/requeue", form, "id=x").0, 403);
        // The dashboard lists the worker, its queues and what it runs.
        let (status, page) = get(http, "/", None);
        assert_eq!(status, 200);
        let worker = page.split(r#"<tr class="worker">"#).nth(1).expect("a worker row");
        assert!(worker.contains("<td>default</td>"), "{worker}");
        get(http, "/metrics", None)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    for line in [
        r#"broker_tasks_total{queue="default",task="report",outcome="enqueued"} 2"#,
        r#"broker_tasks_total{queue="default",task="report",outcome="succeeded"} 1"#,
        r#"broker_queue_tasks{queue="default",state="ready"} 1"#,
        r#"broker_queue_tasks{queue="default",state="leased"} 0"#,
        "broker_connections 1",
        "broker_workers 1",
        r#"broker_task_run_seconds_count{queue="default",task="report"} 1"#,
        r#"broker_queue_wait_seconds_count{queue="default"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    // The log rounds are the single node's own.
    if server.handle.as_ref().unwrap().local_store().is_some() {
        assert!(text.lines().any(|l| l.starts_with("broker_commit_seconds_count ")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("broker_commit_group_size_sum ")), "{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_an_admin_token_when_tokens_are_configured() {
    let tokens = vec![
        TokenConfig { name: "web".into(), token: "web-token-0123456789".into(), role: Role::Producer },
        TokenConfig { name: "ops".into(), token: "ops-token-0123456789".into(), role: Role::Admin },
    ];
    let server = with_http(tokens).await;
    let http = server.handle.as_ref().unwrap().http_addr().unwrap();
    tokio::task::spawn_blocking(move || {
        assert_eq!(get(http, "/metrics", None).0, 401);
        assert_eq!(get(http, "/metrics", Some("web-token-0123456789")).0, 401);
        assert_eq!(get(http, "/metrics", Some("ops-token-0123456789")).0, 200);
        assert_eq!(get(http, "/healthz", None).0, 200, "probes stay open");
        // The dashboard: a login page without the token; the admin token by bearer or by the login's cookie.
        let (status, head, _) = request(http, "GET", "/", "", "");
        assert_eq!(status, 303);
        assert!(head.to_ascii_lowercase().contains("location: /login"), "{head}");
        assert_eq!(get(http, "/", Some("web-token-0123456789")).0, 303);
        let (status, body) = get(http, "/", Some("ops-token-0123456789"));
        assert!(status == 200 && body.contains("Queues"), "{status}");
        let form = "Content-Type: application/x-www-form-urlencoded\r\n";
        assert_eq!(request(http, "POST", "/login", form, "token=web-token-0123456789").0, 401);
        let (status, head, _) = request(http, "POST", "/login", form, "token=ops-token-0123456789");
        assert_eq!(status, 303);
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
            .expect("a cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let pair = cookie.split(';').next().unwrap();
        let (status, _, body) = request(http, "GET", "/", &format!("Cookie: {pair}\r\n"), "");
        assert!(status == 200 && body.contains("Queues"), "{status}");
        // The dead set's forms need it too.
        assert_eq!(request(http, "POST", "/dead/requeue", form, "id=x").0, 303);
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metric_series_are_bounded_whatever_names_producers_choose() {
    let server = with_http(Vec::new()).await;
    let http = server.handle.as_ref().unwrap().http_addr().unwrap();
    let client = server.client().await;
    let specs: Vec<TaskSpec> = (0..1005).map(|i| TaskSpec::new(format!("name-{i}"))).collect();
    client.enqueue_batch(specs).await.unwrap();
    let (status, text) = tokio::task::spawn_blocking(move || get(http, "/metrics", None)).await.unwrap();
    assert_eq!(status, 200);
    let enqueued: Vec<&str> =
        text.lines().filter(|l| l.starts_with("broker_tasks_total{") && l.contains("enqueued")).collect();
    assert_eq!(enqueued.len(), 1001, "series of their own for the first 1,000 pairs, one for the rest");
    assert!(enqueued.contains(&r#"broker_tasks_total{queue="_other",task="_other",outcome="enqueued"} 5"#));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_pauses_and_resumes_a_queue_and_lists_schedules_and_limits() {
    let server = with_http(Vec::new()).await;
    let http = server.handle.as_ref().unwrap().http_addr().unwrap();
    let client = server.client().await;
    client.enqueue(TaskSpec { queue: Some("mail".into()), ..TaskSpec::new("send") }).await.unwrap();
    let schedule = broker_client::proto::ScheduleAdd {
        name: "nightly-digest".into(),
        task: TaskSpec::new("digest"),
        cron: Some("0 3 * * *".into()),
        ..Default::default()
    };
    client.schedule_add(&schedule).await.unwrap();
    let limit = broker_client::proto::SetLimit {
        scope: "task".into(),
        name: "send".into(),
        rate: Some("100/m".into()),
        concurrency: None,
    };
    client.set_limit(&limit).await.unwrap();
    let body = tokio::task::spawn_blocking(move || {
        let form = "Content-Type: application/x-www-form-urlencoded\r\n";
        assert_eq!(request(http, "POST", "/queue/pause", form, "queue=mail&paused=1").0, 303);
        let (_, page) = get(http, "/", None);
        assert_eq!(request(http, "POST", "/queue/pause", form, "queue=%2A&paused=1").0, 400, "not a queue name");
        page
    })
    .await
    .unwrap();
    assert!(body.contains(r#"data-queue="mail" data-paused="true""#), "the row says paused");
    assert!(body.contains("Resume") && body.contains("nightly-digest") && body.contains("0 3 * * * UTC"));
    assert!(body.contains("100/m"));
    assert!(client.stats().await.unwrap().queues.iter().any(|q| q.name == "mail" && q.paused));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_task_page_shows_progress_and_the_workflow() {
    let server = with_http(Vec::new()).await;
    let http = server.handle.as_ref().unwrap().http_addr().unwrap();
    let client = server.client().await;
    let chord = client.enqueue_chord(vec![TaskSpec::new("part")], TaskSpec::new("whole")).await.unwrap();
    let lease = broker_client::proto::Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let member = client.lease(&lease).await.unwrap().pop().unwrap();
    let meta = broker_client::proto::Value::Map(vec![("current".into(), 3.into()), ("total".into(), 10.into())]);
    client.progress(&member.id, member.lease_id, "PROGRESS", meta).await.unwrap();
    let (member_id, callback_id) = (member.id.clone(), chord.callback.id.clone());
    let (member_page, callback_page) = tokio::task::spawn_blocking(move || {
        (get(http, &format!("/task/{member_id}"), None).1, get(http, &format!("/task/{callback_id}"), None).1)
    })
    .await
    .unwrap();
    assert!(
        member_page.contains(r#"id="task-progress-state">PROGRESS"#) && member_page.contains("&quot;current&quot;: 3")
    );
    assert!(member_page.contains("Chord callback") && member_page.contains(&chord.callback.id));
    assert!(callback_page.contains("Members") && callback_page.contains(&member.id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_requeues_and_deletes_a_dead_task() {
    use broker_client::proto::{Fail, TaskError, TaskState};
    let server = with_http(Vec::new()).await;
    let http = server.handle.as_ref().unwrap().http_addr().unwrap();
    let client = server.client().await;
    let unique =
        TaskSpec { unique_key: Some("report-7".into()), unique_for_ms: Some(3_600_000), ..TaskSpec::new("report") };
    let id = client.enqueue(unique.clone()).await.unwrap().id;
    let waiting = client.enqueue(TaskSpec { queue: Some("later".into()), ..TaskSpec::new("wait") }).await.unwrap().id;
    let lease = Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let kill = |lease_id: u64| Fail {
        task_id: id.clone(),
        lease_id,
        error: TaskError { kind: "ValueError".into(), message: "no such report".into(), traceback: None },
        retry: false,
        countdown_ms: None,
    };
    let t = client.lease(&lease).await.unwrap().pop().unwrap();
    client.fail(&kill(t.lease_id)).await.unwrap();

    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let (dead_id, dead_waiting) = (id.clone(), waiting.clone());
    tokio::task::spawn_blocking(move || {
        let (status, page) = get(http, "/dead", None);
        assert!(status == 200 && page.contains(&format!(r#"data-id="{dead_id}""#)), "{page}");
        assert!(page.contains("no such report"));
        let (status, page) = get(http, &format!("/task/{dead_id}"), None);
        assert!(status == 200 && page.contains(r#"class="requeue""#), "a dead task can be requeued: {page}");
        assert_eq!(request(http, "POST", "/task/delete", form, &format!("id={dead_waiting}")).0, 409, "not finished");
        assert_eq!(request(http, "POST", "/dead/requeue", form, &format!("id={dead_id}")).0, 303);
    })
    .await
    .unwrap();
    // Requeued once the redirect came: it runs and dies again.
    assert_eq!(client.get(&id).await.unwrap().state, TaskState::Pending);
    let t = client.lease(&lease).await.unwrap().pop().unwrap();
    assert_eq!(t.id, id);
    client.fail(&kill(t.lease_id)).await.unwrap();
    let again = client.enqueue(unique.clone()).await.unwrap();
    assert!(!again.created && again.id == id, "its unique key is held for an hour");

    let dead_id = id.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(request(http, "POST", "/task/delete", form, &format!("id={dead_id}")).0, 303);
        assert_eq!(get(http, &format!("/task/{dead_id}"), None).0, 404);
        assert!(!get(http, "/dead", None).1.contains(&dead_id));
        // Deleting it again finds nothing, and goes back to the dead set.
        assert_eq!(request(http, "POST", "/task/delete", form, &format!("id={dead_id}")).0, 303);
    })
    .await
    .unwrap();
    assert!(client.get(&id).await.is_err(), "deleted");
    assert_eq!(client.get(&waiting).await.unwrap().state, TaskState::Pending);
    let fresh = client.enqueue(unique).await.unwrap();
    assert!(fresh.created && fresh.id != id, "a deleted task holds its unique key no more");
    server.stop().await;
}
