//! Admin keys and the key-management endpoints (`/v1/admin/keys`), against
//! a real server: who is an admin, what everyone else gets (403
//! `forbidden`), and that created and revoked keys take effect at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, start_in, KEY, OTHER_KEY};
use serde_json::{json, Value};

async fn call(s: &common::Server, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    s.raw(method, path, Some(key), body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn only_admin_keys_manage_keys_and_their_changes_apply_at_once() {
    let s = start(&[]);
    // The first configured key is the operator's: an admin. The second is not.
    let (status, listed) = call(&s, reqwest::Method::GET, "/v1/admin/keys", KEY, None).await;
    assert_eq!(status, 200, "{listed}");
    let keys = listed["data"]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys.iter().map(|k| k["admin"].as_bool().unwrap()).collect::<Vec<_>>(), vec![true, false]);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/admin/keys"),
        (reqwest::Method::POST, "/v1/admin/keys"),
        (reqwest::Method::DELETE, "/v1/admin/keys/key_0000"),
    ] {
        let (status, body) = call(&s, method, path, OTHER_KEY, Some(json!({}))).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["errors"][0]["code"], "forbidden");
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("--admin"));
    }
    let (status, body) = call(&s, reqwest::Method::GET, "/v1/admin/keys", "kiln_wrong", None).await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (401, Some("unauthorized")));

    // A created key works at once, with the settings it was given.
    let (status, made) = call(
        &s,
        reqwest::Method::POST,
        "/v1/admin/keys",
        KEY,
        Some(json!({"label": "team-a", "max_sessions": 1, "network": "none"})),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    let new_key = made["data"]["key"].as_str().unwrap().to_string();
    let new_id = made["data"]["record"]["id"].as_str().unwrap().to_string();
    assert!(new_key.starts_with("kiln_") && new_key.len() == 45);
    assert_eq!(made["data"]["record"]["admin"], false);
    assert_eq!(made["data"]["record"]["network"], "none");
    let (status, ran) =
        s.post("/v1/tci/execute", Some(&new_key), json!({"code": "print(6 * 7)", "language": "python"})).await;
    assert_eq!(status, 200, "{ran}");
    let (status, full) = s.post("/v1/tci/execute", Some(&new_key), json!({"code": "1"})).await;
    assert_eq!((status, full["errors"][0]["code"].as_str()), (429, Some("too_many_sessions")), "its own limit");
    let (status, _) = call(&s, reqwest::Method::GET, "/v1/admin/keys", &new_key, None).await;
    assert_eq!(status, 403, "not an admin key");
    let (status, _) = call(&s, reqwest::Method::GET, "/v1/admin/nodes", &new_key, None).await;
    assert_eq!(status, 403, "not an admin key");
    // Alone, a server is no cluster: no nodes.
    let (status, nodes) = call(&s, reqwest::Method::GET, "/v1/admin/nodes", KEY, None).await;
    assert_eq!((status, &nodes["data"]), (200, &json!({"this_node": null, "nodes": []})), "{nodes}");
    // Its key never appears in a listing, only its id.
    let (_, listed) = call(&s, reqwest::Method::GET, "/v1/admin/keys", KEY, None).await;
    assert!(!listed.to_string().contains(&new_key));
    assert!(listed["data"]["keys"].as_array().unwrap().iter().any(|k| k["id"] == new_id.as_str()));

    // Bad requests are refused with what to fix, and create nothing.
    for (body, param) in [
        (json!({"label": "configured"}), "label"),
        (json!({"label": ""}), "label"),
        (json!({"max_sessions": 0}), "max_sessions"),
        (json!({"label": "tab\there"}), "label"),
    ] {
        let (status, err) = call(&s, reqwest::Method::POST, "/v1/admin/keys", KEY, Some(body)).await;
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some(param)), "{err}");
    }
    let (status, err) = call(&s, reqwest::Method::POST, "/v1/admin/keys", KEY, Some(json!({"network": "lan"}))).await;
    assert_eq!((status, err["errors"][0]["code"].as_str()), (400, Some("invalid_request")));
    let (_, listed) = call(&s, reqwest::Method::GET, "/v1/admin/keys", KEY, None).await;
    assert_eq!(listed["data"]["keys"].as_array().unwrap().len(), 3);

    // Revoked: refused at once. An admin cannot revoke the key it uses.
    let admin_id = keys[0]["id"].as_str().unwrap();
    let (status, err) = call(&s, reqwest::Method::DELETE, &format!("/v1/admin/keys/{admin_id}"), KEY, None).await;
    assert_eq!((status, err["errors"][0]["code"].as_str()), (409, Some("key_in_use")));
    assert_eq!(err["error"]["param"].as_str(), Some("id"));
    let (status, err) = call(&s, reqwest::Method::DELETE, "/v1/admin/keys/key_nope", KEY, None).await;
    assert_eq!((status, err["errors"][0]["code"].as_str()), (404, Some("key_not_found")));
    let (status, _) = call(&s, reqwest::Method::DELETE, &format!("/v1/admin/keys/{new_id}"), KEY, None).await;
    assert_eq!(status, 200);
    let (status, _) = s.post("/v1/tci/execute", Some(&new_key), json!({"code": "1"})).await;
    assert_eq!(status, 401, "refused at once");
    // ... and for good: the periodic reload from the store agrees.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (status, _) = s.post("/v1/tci/execute", Some(&new_key), json!({"code": "1"})).await;
    assert_eq!(status, 401);
    let (_, listed) = call(&s, reqwest::Method::GET, "/v1/admin/keys", KEY, None).await;
    let revoked = listed["data"]["keys"].as_array().unwrap().iter().find(|k| k["id"] == new_id.as_str()).cloned();
    assert!(revoked.unwrap()["revoked_at"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_generated_key_is_an_admin_and_cli_keys_are_admins_only_with_the_flag() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let s = start_in(data, &[], false);
    let generated = std::fs::read_to_string(dir.join("api-key")).unwrap().trim().to_string();
    let (status, _) = call(&s, reqwest::Method::GET, "/v1/admin/keys", &generated, None).await;
    assert_eq!(status, 200);
    let create = |admin: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["keys", "create", "--label", "cli"]).env("KILN_DATA_DIR", &dir);
        if admin {
            cmd.arg("--admin");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (plain, admin) = (create(false), create(true));
    // CLI keys reach a running server through the store within seconds.
    let mut answers = (0, 0);
    for _ in 0..50 {
        answers = (
            call(&s, reqwest::Method::GET, "/v1/admin/keys", &plain, None).await.0,
            call(&s, reqwest::Method::GET, "/v1/admin/keys", &admin, None).await.0,
        );
        if answers.0 != 401 && answers.1 != 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(answers, (403, 200));
    let listed = common::listed_keys(&dir);
    let flags: Vec<(String, bool)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["label"].as_str().unwrap().to_string(), k["admin"].as_bool().unwrap()))
        .collect();
    assert_eq!(flags, vec![("generated".into(), true), ("cli".into(), false), ("cli".into(), true)]);
}
