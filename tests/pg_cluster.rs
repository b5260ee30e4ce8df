//! Tests of the PostgreSQL test cluster (`scripts/pg-cluster` through `tests/common/pg.rs`): writes on the
//! primary reach both standbys, both standbys are synchronous, a promoted standby accepts writes after the
//! primary crashes, and no postgres process outlives the cluster. Each test skips, saying why, on a machine
//! where PostgreSQL 15 is missing and cannot be installed.

#[path = "common/pg.rs"]
mod pg;

use std::time::Duration;

use pg::PgCluster;

/// How long a write on the primary may take to become visible on a standby.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster, or `None` (with the reason on stderr) when PostgreSQL cannot run here.
fn start_or_skip() -> Option<PgCluster> {
    match PgCluster::start() {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[test]
fn writes_on_the_primary_reach_both_synchronous_standbys() {
    let Some(cluster) = start_or_skip() else { return };

    let sync_standbys = cluster
        .psql(
            0,
            "SELECT string_agg(application_name || ' ' || sync_state, ',' ORDER BY application_name)
               FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .unwrap();
    assert_eq!(sync_standbys, "standby1 quorum,standby2 quorum");

    cluster.psql(0, "CREATE TABLE jobs (id int PRIMARY KEY, name text); INSERT INTO jobs VALUES (1, 'first')").unwrap();
    for standby in [1, 2] {
        cluster.wait_for_psql(standby, "SELECT name FROM jobs WHERE id = 1", "first", REPLICATION_TIMEOUT).unwrap();
        let refused = cluster.psql(standby, "INSERT INTO jobs VALUES (2, 'second')").unwrap_err();
        assert!(refused.contains("read-only transaction"), "standby {standby}: {refused}");
    }

    let ports: Vec<String> = (0..3).map(|n| cluster.port(n).to_string()).collect();
    assert_eq!(
        cluster.multi_host_url(),
        format!(
            "postgres://broker@127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/broker?target_session_attrs=read-write",
            ports[0], ports[1], ports[2]
        )
    );
    assert_eq!(cluster.url_list()[0], cluster.primary_url());
    assert_eq!(cluster.url_list()[1..], cluster.standby_urls()[..]);

    // Drop stops every server: none of the postmasters is alive afterwards.
    let pids = cluster.postmaster_pids();
    assert_eq!(pids.len(), 3, "{}", cluster.status());
    drop(cluster);
    for pid in pids {
        // Gone, or a zombie: it exited, and its parent (pg_ctl daemonized it; here it is whoever adopted it, and a
        // container's init may not reap) has not collected it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
        assert!(matches!(state, None | Some("Z") | Some("X")), "postmaster {pid} outlived the cluster: {stat}");
    }
}

#[test]
fn a_promoted_standby_accepts_writes_after_the_primary_crashes() {
    let Some(cluster) = start_or_skip() else { return };

    cluster.psql(0, "CREATE TABLE jobs (id int PRIMARY KEY); INSERT INTO jobs VALUES (1)").unwrap();
    // ANY 1 acknowledges a commit once one standby has it: wait until standby1 has it too before the crash.
    cluster.wait_for_psql(1, "SELECT count(*) FROM jobs", "1", REPLICATION_TIMEOUT).unwrap();
    cluster.stop_primary();
    assert!(cluster.psql(0, "SELECT 1").is_err(), "the primary still answers after stop_primary");

    cluster.promote(1);
    // The commit acknowledged before the crash survived the promotion.
    assert_eq!(cluster.psql(1, "SELECT count(*) FROM jobs").unwrap(), "1");
    assert_eq!(cluster.psql(1, "INSERT INTO jobs VALUES (2) RETURNING id").unwrap(), "2");
    // The remaining standby follows the new primary.
    cluster.wait_for_psql(2, "SELECT count(*) FROM jobs", "2", REPLICATION_TIMEOUT).unwrap();
}
