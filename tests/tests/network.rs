//! The client network without a cluster: the same state the Node conditions
//! carry, over HTTP, from rtnetlink events, for a veth whose peer the test flips.
use std::time::Duration;

use polarstack_tests::{in_new_netns, sh, wait_for, Daemon};

#[test]
fn standalone_daemon_serves_the_client_nic_state() {
    in_new_netns(|| {
        sh(&["ip", "link", "add", "sn0", "type", "veth", "peer", "name", "sn0p"]);
        sh(&["ip", "addr", "add", "2001:db8::7/64", "dev", "sn0"]);
        sh(&["ip", "addr", "add", "192.0.2.7/24", "dev", "sn0"]);
        sh(&["ip", "addr", "add", "198.51.100.7/24", "dev", "sn0"]);
        sh(&["ip", "link", "set", "sn0", "up"]);
        sh(&["ip", "link", "set", "sn0p", "up"]);
        let mut d = Daemon::start(&["--net-card-name", "sn0", "--net-mask", "255.255.255.0"]);
        let net = |d: &Daemon| d.get_ok("/api/v2/network");
        let up = wait_for(Duration::from_secs(10), || net(&d)["state"] == "StateUP");
        assert!(up, "{}\n{}", net(&d), d.log_text());
        let v = net(&d);
        assert_eq!(v["present"], true);
        // IPv4 first; the IPv6 address is listed but never chosen for the IPv4 role.
        assert_eq!(v["client_ip"], "192.0.2.7", "{v}");
        let listed: Vec<&str> =
            v["addresses"].as_array().expect("addresses").iter().filter_map(|a| a["ip"].as_str()).collect();
        for ip in ["192.0.2.7", "198.51.100.7", "2001:db8::7"] {
            assert!(listed.contains(&ip), "{ip} not in {listed:?}");
        }
        assert_eq!(d.get_ok("/api/v2/kubernetes")["mode"], "standalone");

        sh(&["ip", "link", "set", "sn0p", "down"]);
        assert!(wait_for(Duration::from_secs(10), || net(&d)["state"] == "StateDown"), "{}", net(&d));
        sh(&["ip", "addr", "del", "192.0.2.7/24", "dev", "sn0"]);
        assert!(wait_for(Duration::from_secs(10), || net(&d)["client_ip"] == "198.51.100.7"), "{}", net(&d));
        sh(&["ip", "link", "del", "sn0"]);
        let gone =
            wait_for(Duration::from_secs(10), || net(&d)["state"] == "StateUnKnown" && net(&d)["present"] == false);
        assert!(gone, "{}", net(&d));
        assert_eq!(net(&d)["client_ip"], serde_json::Value::Null);
    });
}
