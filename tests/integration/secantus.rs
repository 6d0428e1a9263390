//! The lab's MongoDB-compatible servers do what the replicator will rely on.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::{Document, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

/// Waits for the next change event, up to `timeout`. Polls with `next_if_any` because cancelling
/// `next()` leaves the Rust driver's cursor unusable (LAB-NOTES).
async fn next_event(stream: &mut ChangeStream<ChangeStreamEvent<Document>>, timeout: Duration) -> Result<ChangeStreamEvent<Document>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(event) = stream.next_if_any().await? {
            return Ok(event);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no change event within {timeout:?}");
        }
    }
}

#[tokio::test]
async fn cluster_change_stream_sees_every_event_type() -> Result<()> {
    let server = SecantusServer::start(SecantusOptions::default()).await?;
    let client = server.admin_client().await?;
    let mut stream = client.watch().await.context("cannot open a cluster-scope change stream")?;

    let items = client.database("shop").collection::<Document>("items");
    items.insert_one(doc! {"_id": 1, "n": 1}).await?;
    items.update_one(doc! {"_id": 1}, doc! {"$set": {"n": 2}}).await?;
    items.replace_one(doc! {"_id": 1}, doc! {"_id": 1, "n": 3, "replaced": true}).await?;
    items.delete_one(doc! {"_id": 1}).await?;
    items.insert_one(doc! {"_id": 2}).await?;
    client.database("admin").run_command(doc! {"renameCollection": "shop.items", "to": "shop.archive"}).await?;
    client.database("shop").collection::<Document>("archive").drop().await?;
    client.database("scratch").collection::<Document>("tmp").insert_one(doc! {"_id": 3}).await?;
    client.database("scratch").drop().await?;

    let wait = Duration::from_secs(20);
    let insert = next_event(&mut stream, wait).await?;
    assert_eq!(insert.operation_type, OperationType::Insert);
    assert_eq!(insert.full_document, Some(doc! {"_id": 1, "n": 1}));
    let ns = insert.ns.context("insert without ns")?;
    assert_eq!((ns.db.as_str(), ns.coll.as_deref()), ("shop", Some("items")));

    let update = next_event(&mut stream, wait).await?;
    assert_eq!(update.operation_type, OperationType::Update);
    let description = update.update_description.context("update without updateDescription")?;
    assert_eq!(description.updated_fields, doc! {"n": 2});
    assert_eq!(update.document_key, Some(doc! {"_id": 1}));

    let replace = next_event(&mut stream, wait).await?;
    assert_eq!(replace.operation_type, OperationType::Replace);
    assert_eq!(replace.full_document, Some(doc! {"_id": 1, "n": 3, "replaced": true}));

    let delete = next_event(&mut stream, wait).await?;
    assert_eq!(delete.operation_type, OperationType::Delete);
    assert_eq!(delete.document_key, Some(doc! {"_id": 1}));

    assert_eq!(next_event(&mut stream, wait).await?.operation_type, OperationType::Insert);

    let rename = next_event(&mut stream, wait).await?;
    assert_eq!(rename.operation_type, OperationType::Rename);
    let to = rename.to.context("rename without `to`")?;
    assert_eq!((to.db.as_str(), to.coll.as_deref()), ("shop", Some("archive")));

    let drop = next_event(&mut stream, wait).await?;
    assert_eq!(drop.operation_type, OperationType::Drop);
    assert_eq!(drop.ns.context("drop without ns")?.coll.as_deref(), Some("archive"));

    assert_eq!(next_event(&mut stream, wait).await?.operation_type, OperationType::Insert);
    // mongod reports the drop of each collection before dropDatabase.
    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut stream, wait).await?;
        seen.push(event.operation_type.clone());
        if event.operation_type == OperationType::DropDatabase {
            assert_eq!(event.ns.context("dropDatabase without ns")?.db, "scratch");
            break;
        }
        assert_eq!(event.operation_type, OperationType::Drop, "unexpected event before dropDatabase: {seen:?}");
    }
    Ok(())
}

#[tokio::test]
async fn tls_and_scram_server_keeps_data_and_history_across_restarts() -> Result<()> {
    let admin = ScramUser::new("admin", "s3cret/with:odd@chars", &[("admin", "root")]);
    let mut server = SecantusServer::start(SecantusOptions { tls: true, users: vec![admin.clone()], ..Default::default() }).await?;
    let uri = server.uri_for(&admin);
    assert!(uri.contains("tls=true") && uri.contains("tlsCAFile="), "{}", server.uri());

    let client = mongodb::Client::with_uri_str(&uri).await?;
    let events = client.database("app").collection::<Document>("events");
    let mut stream = events.watch().await?;
    events.insert_one(doc! {"_id": "a"}).await?;
    let first = next_event(&mut stream, Duration::from_secs(20)).await?;
    let token = first.id.clone();
    drop(stream);

    server.restart().await?;
    let client = mongodb::Client::with_uri_str(&uri).await?;
    let events = client.database("app").collection::<Document>("events");
    assert_eq!(events.find_one(doc! {"_id": "a"}).await?, Some(doc! {"_id": "a"}), "data lost in restart");
    events.insert_one(doc! {"_id": "b"}).await?;
    let mut resumed = events.watch().resume_after(token).await?;
    let next = next_event(&mut resumed, Duration::from_secs(20)).await?;
    assert_eq!(next.document_key, Some(doc! {"_id": "b"}), "resume after a restart did not continue after the token");

    // Without credentials the server refuses work; without the CA, TLS refuses the server.
    let anonymous = mongodb::Client::with_uri_str(server.uri()).await?;
    let refused = anonymous.database("app").collection::<Document>("events").find_one(doc! {}).await;
    assert!(refused.is_err(), "unauthenticated read succeeded");
    let untrusted = format!("mongodb://127.0.0.1:{}/?directConnection=true&tls=true&serverSelectionTimeoutMS=2000", server.port());
    let untrusted = mongodb::Client::with_uri_str(untrusted).await?;
    assert!(untrusted.database("admin").run_command(doc! {"ping": 1}).await.is_err(), "TLS accepted an untrusted server");
    Ok(())
}
