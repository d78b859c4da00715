//! The ADS protocol as a client sees it: SotW and Delta streams (the testkit's one scripted client,
//! [`AdsClient`]) against an in-process meshfed ([`meshfed_testkit::server::TestServer`]) fed the two-clouds
//! demo ([`Demo`]), with changes injected as source events. What both flavors must do is one test body run
//! once per flavor ([`flavor_tests!`]: `sotw_…` and `delta_…`), branching only where the protocols differ.
//!
//! Waits are bounded: [`TIMEOUT`] bounds waiting for something that must happen, and [`QUIET`] is how
//! long a test listens to check that nothing arrives. `QUIET` is only a bound on how long a test looks
//! for a stray response, never a timing assertion: a slow machine can only make such a check weaker,
//! not make it fail. Where possible, a "nothing arrives" check follows a witness (another stream, or
//! the push loop) that proves the change in question was already published.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Result;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use meshfed::type_url::{self, ResourceType};
use meshfed_testkit::ads::{AdsClient, Error, Flavor, Request, Response};
use meshfed_testkit::demo::Demo;
use meshfed_testkit::fixtures::{AWS_SIDECAR, lb_endpoint_count};
use meshfed_testkit::flavor_tests;
use meshfed_testkit::server::TestServer;
use tonic::{Code, Status};

/// Bound on waiting for something that must happen.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test listens to check that no response arrives (a bound, not a timing assertion).
const QUIET: Duration = Duration::from_millis(400);

const AWS: &str = "aws-use1";
const AZURE: &str = "azure-weu";

const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const FRONTEND: &str = "outbound|8080||frontend.shop.svc.cluster.local";
const RATINGS_HTTP: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const RATINGS_GRPC: &str = "outbound|9091||ratings.shop.svc.cluster.local";
const REVIEWS_API: &str = "reviews.shop.svc.cluster.local:9080";

/// Polls `f` (in-process state) until it returns Some, failing the test after [`TIMEOUT`].
async fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    meshfed_testkit::eventually(TIMEOUT, what, f).await
}

fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_string).collect()
}

/// The demo, loaded, and a server started on it (its waits bounded by [`TIMEOUT`]).
async fn demo_and_server() -> (Demo, TestServer) {
    let demo = Demo::load().with_timeout(TIMEOUT);
    let server = demo.start().await;
    (demo, server)
}

// ---------------------------------------------------------------------------------------------
// Nodes and clients
// ---------------------------------------------------------------------------------------------

/// A sidecar in aws-use1 (network aws-net, us-east-1a) without traffic interception. `n` makes its
/// node id (pod `client-<n>`, IP 127.0.50.<n>) unique.
fn node(n: u8) -> Node {
    let id = format!("sidecar~127.0.50.{n}~client-{n}.shop~shop.svc.cluster.local");
    meshfed_testkit::fixtures::node(&id, &AWS_SIDECAR, Some(("us-east-1", "us-east-1a")))
}

/// The same placement as [`node`], identifying as a proxyless gRPC client.
fn grpc_node(n: u8) -> Node {
    let mut node = node(n);
    node.metadata.as_mut().expect("set").fields.insert("GENERATOR".into(), meshfed::proxy::string_value("grpc"));
    node.user_agent_name = "gRPC Go".into();
    node
}

/// A client of `flavor` connected to `server` as `node`, its steps bounded by [`TIMEOUT`] and [`QUIET`].
async fn connect(server: &TestServer, flavor: Flavor, node: Node) -> Result<AdsClient> {
    Ok(AdsClient::connect(server.xds_addr, flavor, node).await?.with_timeouts(TIMEOUT, QUIET))
}

/// The ClusterLoadAssignment `name` in an EDS response.
fn cla(r: &Response, name: &str) -> Result<ClusterLoadAssignment> {
    Ok(r.decode(name)?)
}

/// The sync status of `t` on the connection of proxy `client-<n>.shop`.
fn status(server: &TestServer, n: u8, t: ResourceType) -> Option<meshfed::xds::connections::TypeStatus> {
    let conn = server.connections.find(&format!("client-{n}.shop"))?;
    Some(conn.status()[t.index()].clone())
}

// ---------------------------------------------------------------------------------------------
// 1. SotW subscriptions and ACKs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_cds_wildcard_and_named_eds_are_answered_once() -> Result<()> {
    let (_demo, server) = demo_and_server().await;
    let mut c = connect(&server, Flavor::Sotw, node(1)).await?;

    c.subscribe::<&str>(type_url::CLUSTER, &[]).await?;
    let cds = c.recv_type(type_url::CLUSTER).await?;
    let clusters = cds.names();
    for name in [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC] {
        assert!(clusters.contains(name), "CDS wildcard carries {name}: {clusters:?}");
    }
    assert!(!cds.version.is_empty(), "SotW responses carry a version");
    c.ack(&cds).await?;
    c.expect_silence("after the CDS ACK").await?;

    let names = [REVIEWS, FRONTEND];
    c.subscribe(type_url::ENDPOINT, &names).await?;
    let eds = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(eds.names(), set(names), "EDS answers exactly the named assignments");
    assert_eq!(eds.resources.len(), 2, "each assignment once");
    assert!(lb_endpoint_count(&cla(&eds, REVIEWS)?) > 0, "reviews has endpoints");
    c.ack(&eds).await?;
    c.expect_silence("after the EDS ACK").await?;

    let st = eventually("the EDS ACK to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == eds.nonce)
    })
    .await;
    assert!(st.last_error.is_none());
    assert_eq!(st.subscribed_names, 2);
    assert!(!st.wildcard);

    // After the ACK, requests still carry the latest nonce: a changed list is answered.
    let more = set([REVIEWS, FRONTEND, RATINGS_HTTP]);
    c.subscribe(type_url::ENDPOINT, &[RATINGS_HTTP]).await?;
    assert_eq!(c.subscribed(type_url::ENDPOINT), [REVIEWS, FRONTEND, RATINGS_HTTP], "the whole list is sent");
    let eds2 = c.recv_type(type_url::ENDPOINT).await?;
    assert!(eds2.names().contains(RATINGS_HTTP), "{:?}", eds2.names());
    assert!(eds2.names().is_subset(&more), "{:?}", eds2.names());
    c.ack(&eds2).await?;
    c.expect_silence("after the second EDS ACK").await?;
    Ok(())
}

/// A client that reconnects may send the nonce it last saw on its previous stream: the first request
/// of a type on a stream is an initial request whatever its nonce.
#[tokio::test]
async fn sotw_first_request_with_a_nonce_from_an_earlier_stream_is_answered() -> Result<()> {
    let (_demo, server) = demo_and_server().await;
    let cds = {
        let mut c = connect(&server, Flavor::Sotw, node(1)).await?;
        c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?
    };
    let mut c = connect(&server, Flavor::Sotw, node(1)).await?;
    c.send(Request { version: cds.version.clone(), nonce: cds.nonce.clone(), ..Request::new(type_url::CLUSTER) })
        .await?;
    let again = c.recv_type(type_url::CLUSTER).await?;
    assert_eq!(again.names(), cds.names(), "the complete state again");
    c.ack(&again).await?;
    c.expect_silence("after the ACK").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. NACK
// ---------------------------------------------------------------------------------------------

async fn nack_is_recorded_and_not_resent_until_content_changes(flavor: Flavor) -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let mut c = connect(&server, flavor, node(1)).await?;
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;

    let names = [REVIEWS, FRONTEND];
    c.subscribe(type_url::ENDPOINT, &names).await?;
    let rejected = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(rejected.names(), set(names));
    let endpoints_before = lb_endpoint_count(&cla(&rejected, REVIEWS)?);
    c.nack(&rejected, "test rejects these assignments").await?;

    let st = eventually("the NACK to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.last_error.is_some())
    })
    .await;
    assert_eq!(st.last_error.as_deref(), Some("test rejects these assignments"));
    assert_eq!(st.nacks, 1);
    assert_eq!(
        server.connections.list()[0].status()[ResourceType::Endpoint.index()].last_error.as_deref(),
        Some("test rejects these assignments")
    );
    c.expect_silence("after a NACK, the rejected version is not sent again").await?;

    // A real change of reviews' assignment is a new version: it is sent (and only it: frontend's
    // rejected version did not change).
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(update.names(), set([REVIEWS]), "only the changed assignment is sent");
    assert!(update.removed.is_empty());
    assert_eq!(lb_endpoint_count(&cla(&update, REVIEWS)?), endpoints_before - 1);
    assert_ne!(update.nonce, rejected.nonce, "a new nonce");
    match flavor {
        Flavor::Sotw => assert_ne!(update.version, rejected.version, "a new version"),
        Flavor::Delta => assert_ne!(
            update.versions()[REVIEWS],
            rejected.versions()[REVIEWS],
            "the changed assignment has a new version"
        ),
    }
    c.ack(&update).await?;
    eventually("the ACK to clear the error", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == update.nonce && s.last_error.is_none())
    })
    .await;
    c.expect_silence("after the ACK").await?;
    Ok(())
}

flavor_tests!(
    nack_is_recorded_and_not_resent_until_content_changes
        => sotw_nack_is_recorded_and_not_resent_until_content_changes,
           delta_nack_is_recorded_and_not_resent_until_content_changes -> Result<()>
);

/// A client that NACKs a response after the server sent a newer one for the same resource holds what
/// that newer response carried (once it ACKs it). Delta lets several responses be in flight: the NACK
/// must not make the server believe the client went back to the version before the NACKed one, or a
/// later change back to exactly that version would never be sent. SotW: the NACK of an older response is
/// stale and ignored; the newer one counts.
async fn nack_of_a_superseded_response_keeps_the_newer_state(flavor: Flavor) -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let original = demo.objects.clone();
    let mut c = connect(&server, flavor, node(1)).await?;
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let v0 = c.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await?;
    let endpoints_v0 = lb_endpoint_count(&cla(&v0, REVIEWS)?);

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n1 = c.recv_type(type_url::ENDPOINT).await?;
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n2 = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(n2.names(), set([REVIEWS]));
    // (SotW: the NACK carries v0's version, the last this client accepted.)
    c.nack(&n1, "test rejects the first update").await?;
    c.ack(&n2).await?;
    eventually("the ACK of the newer response", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == n2.nonce)
    })
    .await;

    // The client holds n2's version; the original content is a change for it.
    demo.objects = original;
    demo.publish(&server, &[AWS]).await;
    let back = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(lb_endpoint_count(&cla(&back, REVIEWS)?), endpoints_v0, "the original content again");
    if flavor == Flavor::Delta {
        assert_eq!(back.versions()[REVIEWS], v0.versions()[REVIEWS], "the original content's version again");
    }
    c.ack(&back).await?;
    c.expect_silence("after the ACK").await?;
    Ok(())
}

flavor_tests!(
    nack_of_a_superseded_response_keeps_the_newer_state
        => sotw_nack_of_a_superseded_response_keeps_the_newer_state,
           delta_nack_of_a_superseded_response_keeps_the_newer_state -> Result<()>
);

/// A NACK that arrives after the server already sent a newer response (a push racing the client) still
/// counts: the rejection is recorded, and the client is known to hold what it had before.
#[tokio::test]
async fn sotw_nack_racing_a_newer_push_is_recorded() -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let original = demo.objects.clone();
    let mut c = connect(&server, Flavor::Sotw, node(1)).await?;
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let names = [REVIEWS, FRONTEND];
    c.subscribe_and_ack(type_url::ENDPOINT, &names).await?;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n1 = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(n1.names(), set([REVIEWS]));
    demo.drop_endpoint(AWS, "frontend");
    demo.publish(&server, &[AWS]).await;
    let n2 = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(n2.names(), set([FRONTEND]));
    // the client answers n1 only now: a NACK carrying the older nonce
    c.nack(&n1, "test rejects the reviews update").await?;
    c.ack(&n2).await?;
    let s = eventually("the NACK of the older response and the ACK of the newer", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == n2.nonce && s.nacks == 1)
    })
    .await;
    assert_eq!(s.nacks, 1);

    // reviews back to the content the client kept: nothing to send (the client never took the update)
    demo.objects = original;
    demo.publish(&server, &[AWS]).await;
    let back = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(back.names(), set([FRONTEND]), "only frontend differs from what the client holds");
    c.ack(&back).await?;
    c.expect_silence("after the ACK").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Stale nonce
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_request_with_stale_nonce_is_ignored() -> Result<()> {
    let (_demo, server) = demo_and_server().await;
    let mut c = connect(&server, Flavor::Sotw, node(1)).await?;
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;

    c.subscribe(type_url::ENDPOINT, &[REVIEWS]).await?;
    let first = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(first.names(), set([REVIEWS]));
    // ACK while adding a name: a newer response follows.
    c.ack_subscribing(&first, &[FRONTEND]).await?;
    let second = c.recv_type(type_url::ENDPOINT).await?;
    assert!(second.names().contains(FRONTEND), "{:?}", second.names());
    assert_ne!(second.nonce, first.nonce);

    // A request answering the older response, with a changed list, is stale: ignored.
    let all = [REVIEWS, FRONTEND, RATINGS_HTTP];
    let stale =
        Request { version: first.version.clone(), nonce: first.nonce.clone(), ..Request::new(type_url::ENDPOINT) };
    c.send(stale.names(&all)).await?;
    c.expect_silence("a request with a stale nonce").await?;

    // The same change with the latest nonce is answered, which also shows that the stale request did
    // not change the subscription (an unchanged list would draw no response).
    c.ack_subscribing(&second, &[RATINGS_HTTP]).await?;
    assert_eq!(c.subscribed(type_url::ENDPOINT), all);
    let third = c.recv_type(type_url::ENDPOINT).await?;
    assert!(third.names().contains(RATINGS_HTTP), "{:?}", third.names());
    c.ack(&third).await?;
    c.expect_silence("after the ACK").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Unsubscribe
// ---------------------------------------------------------------------------------------------

/// SotW unsubscribes with the list without the name (here: an empty list, which for EDS is no
/// subscription at all, not a wildcard); Delta with `resource_names_unsubscribe` (here: one of two).
async fn unsubscribe_stops_updates(flavor: Flavor) -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let names: &[&str] = match flavor {
        Flavor::Sotw => &[REVIEWS],
        Flavor::Delta => &[REVIEWS, FRONTEND],
    };
    let mut c = connect(&server, flavor, node(1)).await?;
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, names).await?;
    assert_eq!(eds.names(), set(names.iter().copied()));
    // A witness that stays subscribed: it proves the change reached the streams.
    let mut witness = connect(&server, flavor, node(2)).await?;
    witness.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    witness.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await?;

    c.unsubscribe(type_url::ENDPOINT, &[REVIEWS]).await?;
    c.expect_silence("unsubscribing").await?;
    eventually("the unsubscription to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.subscribed_names == names.len() - 1 && !s.wildcard)
    })
    .await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let seen = witness.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(seen.names(), set([REVIEWS]));
    c.expect_silence("an endpoint change after unsubscribing").await?;
    Ok(())
}

flavor_tests!(
    unsubscribe_stops_updates
        => sotw_empty_resource_list_unsubscribes_named_eds, delta_unsubscribe_stops_updates -> Result<()>
);

// ---------------------------------------------------------------------------------------------
// 5. Delta subscriptions, pushes and removals
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delta_subscriptions_pushes_and_removals() -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let mut c = connect(&server, Flavor::Delta, node(1)).await?;

    c.subscribe::<&str>(type_url::CLUSTER, &[]).await?;
    let cds = c.recv_type(type_url::CLUSTER).await?;
    let clusters = cds.names();
    for name in [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC] {
        assert!(clusters.contains(name), "CDS wildcard carries {name}: {clusters:?}");
    }
    assert!(cds.removed.is_empty());
    assert!(cds.resources.iter().all(|r| !r.version.is_empty()), "Delta resources carry versions");
    c.ack(&cds).await?;
    c.expect_silence("after the CDS ACK").await?;

    let eds_names = [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC];
    c.subscribe(type_url::ENDPOINT, &eds_names).await?;
    let eds = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(eds.names(), set(eds_names), "EDS answers exactly the named assignments");
    c.ack(&eds).await?;
    c.expect_silence("after the EDS ACK").await?;

    // An endpoints-only change: one EDS response with only the changed assignment.
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(update.names(), set([REVIEWS]));
    assert!(update.removed.is_empty());
    assert_ne!(update.versions()[REVIEWS], eds.versions()[REVIEWS]);
    c.ack(&update).await?;
    c.expect_silence("after an endpoints-only change").await?;

    // ratings goes away in both clusters: its clusters and assignments are removed.
    demo.remove_service(AWS, "ratings");
    demo.remove_service(AZURE, "ratings");
    demo.publish(&server, &[AWS, AZURE]).await;
    let gone = set([RATINGS_HTTP, RATINGS_GRPC]);
    let mut removed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let done = |removed: &BTreeMap<String, BTreeSet<String>>| {
        [type_url::CLUSTER, type_url::ENDPOINT].iter().all(|t| removed.get(*t).is_some_and(|r| r == &gone))
    };
    while !done(&removed) {
        let r = c.recv().await?;
        assert!(
            r.type_url == type_url::CLUSTER || r.type_url == type_url::ENDPOINT,
            "only the subscribed types: got {}",
            r.type_url
        );
        // (Should both clusters' syncs land in separate pushes, ratings' assignment may first shrink.)
        for name in r.names() {
            assert!(
                r.type_url == type_url::ENDPOINT && gone.contains(&name),
                "removing ratings sends no other resource: {} {name}",
                r.type_url
            );
        }
        removed.entry(r.type_url.clone()).or_default().extend(r.removed_names());
        c.ack(&r).await?;
    }
    c.expect_silence("after the removal").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Delta reconnect
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delta_reconnect_with_initial_resource_versions_sends_only_changes() -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let names = [REVIEWS, FRONTEND];
    let held = {
        let mut c = connect(&server, Flavor::Delta, node(1)).await?;
        c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
        let eds = c.subscribe_and_ack(type_url::ENDPOINT, &names).await?;
        assert_eq!(eds.names(), set(names));
        c.held().clone()
    };
    eventually("the first stream to go away", || server.connections.is_empty().then_some(())).await;

    // While disconnected, reviews' endpoints change (EDS only).
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;

    // The first request of each type carries the versions held as initial_resource_versions.
    let mut c = connect(&server, Flavor::Delta, node(1)).await?.holding(held.clone());
    c.subscribe::<&str>(type_url::CLUSTER, &[]).await?;
    let cds = c.recv_type(type_url::CLUSTER).await?;
    assert!(cds.resources.is_empty(), "every cluster is unchanged: {:?}", cds.names());
    assert!(cds.removed.is_empty(), "nothing was removed: {:?}", cds.removed);
    c.ack(&cds).await?;

    c.subscribe(type_url::ENDPOINT, &names).await?;
    let eds = c.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(eds.names(), set([REVIEWS]), "only the changed assignment is sent");
    assert_ne!(eds.versions()[REVIEWS], held.versions(type_url::ENDPOINT)[REVIEWS]);
    assert!(eds.removed.is_empty());
    c.ack(&eds).await?;
    c.expect_silence("after the reconnect").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. An endpoint change reaches only the proxies subscribed to it, only as EDS
// ---------------------------------------------------------------------------------------------

async fn endpoint_change_reaches_only_subscribed_proxies_as_eds(flavor: Flavor) -> Result<()> {
    let (mut demo, server) = demo_and_server().await;
    let mut a = connect(&server, flavor, node(1)).await?;
    let mut b = connect(&server, flavor, node(2)).await?;
    for (c, eds) in [(&mut a, REVIEWS), (&mut b, FRONTEND)] {
        c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
        c.subscribe_and_ack::<&str>(type_url::LISTENER, &[]).await?;
        let r = c.subscribe_and_ack(type_url::ENDPOINT, &[eds]).await?;
        assert_eq!(r.names(), set([eds]));
    }
    a.expect_silence("A after subscribing").await?;
    b.expect_silence("B after subscribing").await?;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = a.recv_type(type_url::ENDPOINT).await?;
    assert_eq!(update.names(), set([REVIEWS]));
    assert!(update.removed.is_empty());
    a.ack(&update).await?;
    a.expect_silence("A after the endpoint change").await?;
    b.expect_silence("B (not subscribed to reviews) after the endpoint change").await?;
    Ok(())
}

flavor_tests!(
    endpoint_change_reaches_only_subscribed_proxies_as_eds
        => sotw_endpoint_change_reaches_only_subscribed_proxies_as_eds,
           delta_endpoint_change_reaches_only_subscribed_proxies_as_eds -> Result<()>
);

// ---------------------------------------------------------------------------------------------
// 8. Invalid nodes
// ---------------------------------------------------------------------------------------------

fn bad_node() -> Node {
    Node { id: "not-a-node-id".into(), ..node(1) }
}

/// The status a stream whose first request is a CDS request with `node` ends with: from opening it, or
/// from its first message.
async fn refusal(server: &TestServer, flavor: Flavor, node: Option<Node>) -> Result<Status> {
    let channel = meshfed_testkit::ads::channel(server.xds_addr).await?;
    let first = Request { node, ..Request::new(type_url::CLUSTER) };
    match AdsClient::open_with(channel, flavor, first).await {
        Err(Error::Status(status)) => Ok(status),
        Err(other) => Err(other.into()),
        Ok(c) => Ok(c.with_timeouts(TIMEOUT, QUIET).expect_failure().await?),
    }
}

async fn invalid_or_missing_node_fails_the_stream(flavor: Flavor) -> Result<()> {
    let (_demo, server) = demo_and_server().await;

    let status = refusal(&server, flavor, Some(bad_node())).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not-a-node-id"), "the message names the node id: {status:?}");
    assert!(status.message().contains("parts"), "the message says what is wrong: {status:?}");

    let status = refusal(&server, flavor, None).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node"), "the message says the node is missing: {status:?}");

    assert!(server.connections.is_empty(), "refused streams are not registered");
    Ok(())
}

flavor_tests!(
    invalid_or_missing_node_fails_the_stream
        => sotw_invalid_or_missing_node_fails_the_stream, delta_invalid_or_missing_node_fails_the_stream -> Result<()>
);

// ---------------------------------------------------------------------------------------------
// 9. Unknown type URLs
// ---------------------------------------------------------------------------------------------

const UNKNOWN_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// SotW answers a type it does not serve with an empty response; Delta ignores it. Either way the stream
/// goes on.
async fn unknown_type_and_the_stream_continues(flavor: Flavor) -> Result<()> {
    let (_demo, server) = demo_and_server().await;
    let mut c = connect(&server, flavor, node(1)).await?;

    c.subscribe(UNKNOWN_TYPE, &["default"]).await?;
    match flavor {
        Flavor::Sotw => {
            let r = c.recv_type(UNKNOWN_TYPE).await?;
            assert!(r.resources.is_empty(), "an empty response");
            c.ack(&r).await?;
            c.expect_silence("an ACK of the empty response (answering it would never end)").await?;
        }
        Flavor::Delta => c.expect_silence("an unknown type").await?,
    }

    c.subscribe::<&str>(type_url::CLUSTER, &[]).await?;
    let cds = c.recv_type(type_url::CLUSTER).await?;
    assert!(cds.names().contains(REVIEWS));
    c.ack(&cds).await?;
    c.expect_silence("after the CDS ACK").await?;
    Ok(())
}

flavor_tests!(
    unknown_type_and_the_stream_continues
        => sotw_unknown_type_gets_an_empty_response_and_the_stream_continues,
           delta_unknown_type_is_ignored_and_the_stream_continues -> Result<()>
);

// ---------------------------------------------------------------------------------------------
// 10. Deterministic versions
// ---------------------------------------------------------------------------------------------

/// The versions (SotW: of the responses; Delta: name -> version) and the resources' bytes (sorted) a
/// client with `node(1)` gets of CDS and of EDS (`eds`; Delta: wildcard).
type State = (String, String, BTreeMap<String, String>, BTreeMap<String, String>, Vec<Vec<u8>>);

async fn state_of(server: &TestServer, flavor: Flavor, eds: &[&str]) -> Result<State> {
    let mut c = connect(server, flavor, node(1)).await?;
    let cds = c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds_names: &[&str] = if flavor == Flavor::Delta { &[] } else { eds };
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, eds_names).await?;
    assert!(cds.names().contains(REVIEWS) && eds.names().contains(REVIEWS), "{:?} {:?}", cds.names(), eds.names());
    let mut bodies: Vec<Vec<u8>> = cds.resources.iter().chain(&eds.resources).map(|r| r.body.value.clone()).collect();
    bodies.sort();
    Ok((cds.version.clone(), eds.version.clone(), cds.versions(), eds.versions(), bodies))
}

#[tokio::test]
async fn versions_are_deterministic_across_servers() -> Result<()> {
    let (demo, one) = demo_and_server().await;
    let two = demo.start().await;
    let names = [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC];
    for flavor in [Flavor::Delta, Flavor::Sotw] {
        let (a, b) = (state_of(&one, flavor, &names).await?, state_of(&two, flavor, &names).await?);
        assert_eq!(a, b, "{} versions and resources", flavor.as_str());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 11. api_listeners for proxyless gRPC
// ---------------------------------------------------------------------------------------------

async fn api_listeners_only_by_name(flavor: Flavor) -> Result<()> {
    let (_demo, server) = demo_and_server().await;

    let mut grpc = connect(&server, flavor, grpc_node(1)).await?;
    let lds = grpc.subscribe_and_ack(type_url::LISTENER, &[REVIEWS_API]).await?;
    assert_eq!(lds.names(), set([REVIEWS_API]), "exactly the named listener");
    let got: Vec<Listener> = lds.decode_all()?;
    assert_eq!(got.len(), 1, "the named listener once: {:?}", lds.names());
    assert_eq!(got[0].name, REVIEWS_API);
    assert!(got[0].api_listener.as_ref().is_some_and(|a| a.api_listener.is_some()), "an api_listener");
    grpc.expect_silence("after the LDS ACK").await?;

    let mut envoy = connect(&server, flavor, node(2)).await?;
    let lds = envoy.subscribe_and_ack::<&str>(type_url::LISTENER, &[]).await?;
    let got: Vec<Listener> = lds.decode_all()?;
    assert!(!got.is_empty(), "a sidecar has listeners");
    for l in &got {
        assert!(l.api_listener.is_none(), "wildcard LDS carries no api_listener: {}", l.name);
    }
    assert!(!lds.names().contains(REVIEWS_API));
    Ok(())
}

flavor_tests!(
    api_listeners_only_by_name => sotw_api_listeners_only_by_name, delta_api_listeners_only_by_name -> Result<()>
);
