use super::*;

fn iothread(id: &str, poll_max_ns: Option<i64>) -> ObjectOptions {
    ObjectOptions {
        id: id.into(),
        u: ObjectOptionsBranch::Iothread(IothreadProperties {
            poll_max_ns,
            poll_grow: None,
            poll_shrink: None,
            aio_max_batch: None,
        }),
    }
}

fn chardev(id: &str) -> Chardev {
    Chardev {
        id: id.into(),
        path: PathBuf::from("/run/qmp.sock"),
        monitor: true,
        clients: Arc::new(AtomicUsize::new(1)),
    }
}

fn names(props: Vec<ObjectPropertyInfo>) -> Vec<String> {
    props
        .into_iter()
        .map(|p| format!("{}:{}", p.name, p.r#type))
        .collect()
}

#[test]
fn root_lists_the_three_containers() {
    let view = View {
        objects: &[],
        chardevs: &[],
    };
    assert_eq!(
        names(list(&view, "/").unwrap_or_default()),
        [
            "type:string",
            "backend:child<container>",
            "objects:child<container>",
            "chardevs:child<container>"
        ]
    );
}

#[test]
fn objects_container_lists_iothreads_as_children() {
    let objects = [iothread("io0", None)];
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(
        names(list(&view, "//objects/").unwrap_or_default()),
        ["type:string", "io0:child<iothread>"]
    );
}

#[test]
fn partial_path_matches_the_end_of_one_path() {
    let objects = [iothread("io0", Some(1000))];
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(get(&view, "io0", "poll-max-ns"), Ok(Value::from(1000)));
}

#[test]
fn partial_path_matching_two_objects_is_ambiguous() {
    let objects = [iothread("m", None)];
    let chardevs = [chardev("m")];
    let view = View {
        objects: &objects,
        chardevs: &chardevs,
    };
    assert_eq!(
        get(&view, "m", "type").map_err(|e| e.desc),
        Err("Path 'm' is ambiguous".to_string())
    );
}

#[test]
fn unknown_path_is_device_not_found() {
    let view = View {
        objects: &[],
        chardevs: &[],
    };
    let err = list(&view, "/objects/nope").err();
    assert_eq!(
        err.map(|e| (e.class, e.desc)),
        Some((
            QapiErrorClass::DeviceNotFound,
            "Device '/objects/nope' not found".to_string()
        ))
    );
}

#[test]
fn child_property_reads_as_the_childs_path() {
    let objects = [iothread("io0", None)];
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(
        get(&view, "/objects", "io0"),
        Ok(Value::from("/objects/io0"))
    );
}

#[test]
fn iothread_defaults_read_as_qemus() {
    let objects = [iothread("io0", None)];
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(
        get(&view, "/objects/io0", "poll-max-ns"),
        Ok(Value::from(32768))
    );
}

#[test]
fn chardev_shows_its_address_and_connection() {
    let chardevs = [chardev("mon0")];
    let view = View {
        objects: &[],
        chardevs: &chardevs,
    };
    assert_eq!(
        get(&view, "/chardevs/mon0", "connected"),
        Ok(Value::Bool(true))
    );
    assert_eq!(
        get(&view, "/chardevs/mon0", "addr"),
        Ok(json!({"type": "unix", "path": "/run/qmp.sock"}))
    );
}

#[test]
fn unknown_property_names_type_and_property() {
    let objects = [iothread("io0", None)];
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(
        get(&view, "/objects/io0", "nope").map_err(|e| e.desc),
        Err("Property 'iothread.nope' not found".to_string())
    );
}

#[test]
fn set_changes_the_object_and_names_it() {
    let mut objects = [iothread("io0", None)];
    let id = set(
        &mut objects,
        &[],
        "/objects/io0",
        "poll-grow",
        &Value::from(4),
    );
    assert_eq!(id, Ok("io0".to_string()));
    let view = View {
        objects: &objects,
        chardevs: &[],
    };
    assert_eq!(get(&view, "io0", "poll-grow"), Ok(Value::from(4)));
}

#[test]
fn set_refuses_negative_values_with_qemus_range_message() {
    let mut objects = [iothread("io0", None)];
    let err = set(&mut objects, &[], "io0", "poll-grow", &Value::from(-1));
    assert_eq!(
        err.map_err(|e| e.desc),
        Err("poll-grow value must be in range [0, 9223372036854775807]".to_string())
    );
}

#[test]
fn set_refuses_a_value_of_the_wrong_type() {
    let mut objects = [iothread("io0", None)];
    let err = set(&mut objects, &[], "io0", "poll-max-ns", &Value::from(1.5));
    assert_eq!(
        err.map_err(|e| e.desc),
        Err("Invalid parameter type for 'poll-max-ns', expected: integer".to_string())
    );
}

#[test]
fn set_refuses_read_only_properties() {
    let mut objects = [iothread("io0", None)];
    let err = set(&mut objects, &[], "io0", "type", &Value::from("x"));
    assert_eq!(
        err.map_err(|e| e.desc),
        Err("Property 'iothread.type' is not writable".to_string())
    );
}
