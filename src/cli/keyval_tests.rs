use super::*;
use serde_json::json;

fn kv(input: &str) -> Result<Value, KeyvalError> {
    parse_keyval(input, None)
}

fn err(input: &str) -> String {
    match kv(input) {
        Ok(v) => panic!("{input:?} parsed to {v}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn flat_pairs_become_string_members_in_order() {
    let v = kv("driver=file,filename=a.img,read-only=on").unwrap();
    assert_eq!(
        v,
        json!({"driver": "file", "filename": "a.img", "read-only": "on"})
    );
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["driver", "filename", "read-only"]);
}

#[test]
fn empty_string_is_empty_object() {
    assert_eq!(kv("").unwrap(), json!({}));
}

#[test]
fn trailing_comma_is_allowed() {
    assert_eq!(kv("a=1,").unwrap(), json!({"a": "1"}));
}

#[test]
fn empty_value_is_empty_string() {
    assert_eq!(kv("a=,b=").unwrap(), json!({"a": "", "b": ""}));
}

#[test]
fn double_comma_is_a_literal_comma() {
    assert_eq!(kv("a=x,,y,b=2").unwrap(), json!({"a": "x,y", "b": "2"}));
    assert_eq!(kv("a=,,").unwrap(), json!({"a": ","}));
    assert_eq!(kv("a=1,,,b=2").unwrap(), json!({"a": "1,", "b": "2"}));
}

#[test]
fn values_keep_equals_signs_and_dots() {
    assert_eq!(kv("a=x=y.z").unwrap(), json!({"a": "x=y.z"}));
}

#[test]
fn dotted_keys_build_nested_objects() {
    let v = kv("file.driver=file,file.filename=a.img,driver=qcow2").unwrap();
    assert_eq!(
        v,
        json!({"file": {"driver": "file", "filename": "a.img"}, "driver": "qcow2"})
    );
}

#[test]
fn deep_nesting_works() {
    let v = kv("a.b.c.d=1,a.b.e=2").unwrap();
    assert_eq!(v, json!({"a": {"b": {"c": {"d": "1"}, "e": "2"}}}));
}

#[test]
fn index_keys_become_arrays_in_index_order() {
    assert_eq!(kv("a.0=x,a.1=y").unwrap(), json!({"a": ["x", "y"]}));
    assert_eq!(kv("a.1=y,a.0=x").unwrap(), json!({"a": ["x", "y"]}));
}

#[test]
fn arrays_of_objects_and_nested_arrays() {
    let v = kv("s.0.host=a,s.0.port=1,s.1.host=b,m.0.0=z").unwrap();
    assert_eq!(
        v,
        json!({"s": [{"host": "a", "port": "1"}, {"host": "b"}], "m": [["z"]]})
    );
}

#[test]
fn last_value_for_a_leaf_wins() {
    assert_eq!(kv("a=1,b=2,a=3").unwrap(), json!({"a": "3", "b": "2"}));
    assert_eq!(kv("x.y=1,x.y=2").unwrap(), json!({"x": {"y": "2"}}));
}

#[test]
fn downstream_prefixed_names_are_keys() {
    let v = kv("__com.example_opt=1,a.__org_x=2").unwrap();
    assert_eq!(v, json!({"__com.example_opt": "1", "a": {"__org_x": "2"}}));
}

#[test]
fn missing_equals_names_the_key() {
    assert_eq!(err("x"), "Expected '=' after parameter 'x'");
    assert_eq!(err("a=1,b"), "Expected '=' after parameter 'b'");
    assert_eq!(err("a=1,b.c,d=2"), "Expected '=' after parameter 'b.c'");
}

#[test]
fn invalid_keys_are_named_whole() {
    assert_eq!(err("=1"), "Invalid parameter ''");
    assert_eq!(err(","), "Invalid parameter ''");
    assert_eq!(err("a=1,=2"), "Invalid parameter ''");
    assert_eq!(err("1a=x"), "Invalid parameter '1a'");
    assert_eq!(err("0=x"), "Invalid parameter '0'");
    assert_eq!(err("a b=x"), "Invalid parameter 'a b'");
    assert_eq!(err("a..b=x"), "Invalid parameter 'a..b'");
    assert_eq!(err("a.=x"), "Invalid parameter 'a.'");
    assert_eq!(err(".a=x"), "Invalid parameter '.a'");
    assert_eq!(err("a.0x=1"), "Invalid parameter 'a.0x'");
    assert_eq!(err("_a=1"), "Invalid parameter '_a'");
}

#[test]
fn overlong_key_and_fragment_are_rejected() {
    let long = "k".repeat(128);
    assert_eq!(
        err(&format!("{long}=1")),
        format!("Parameter '{long}' is too long")
    );
    assert_eq!(
        err(&format!("a.{long}=1")),
        format!("Parameter fragment '{long}' is too long")
    );
    let ok = "k".repeat(127);
    assert!(kv(&format!("{ok}=1")).is_ok());
}

#[test]
fn scalar_then_object_conflicts() {
    assert_eq!(err("a=1,a.b=2"), "Parameters 'a.*' used inconsistently");
    assert_eq!(
        err("a.b=1,a.b.c=2"),
        "Parameters 'a.b.*' used inconsistently"
    );
}

#[test]
fn object_then_scalar_conflicts() {
    assert_eq!(err("a.b=2,a=1"), "Parameters 'a.*' used inconsistently");
    assert_eq!(
        err("x.y.z=1,x.y=2"),
        "Parameters 'x.y.*' used inconsistently"
    );
}

#[test]
fn conflict_is_found_before_a_bad_later_fragment_only_after_checking_it() {
    // QEMU checks a fragment before creating the object in front of it.
    assert_eq!(err("a=1,a.-=2"), "Invalid parameter 'a.-'");
    assert_eq!(err("a=1,a.b.-=2"), "Parameters 'a.*' used inconsistently");
}

#[test]
fn indexes_mixed_with_names_conflict() {
    assert_eq!(err("a.0=x,a.b=y"), "Parameters 'a.*' used inconsistently");
    assert_eq!(
        err("a.b.0=x,a.b.c=y"),
        "Parameters 'a.b.*' used inconsistently"
    );
}

#[test]
fn gaps_in_indexes_name_the_first_missing_one() {
    assert_eq!(err("a.1=x"), "Parameter 'a.0' missing");
    assert_eq!(err("a.0=x,a.2=y"), "Parameter 'a.1' missing");
    assert_eq!(err("a.0=x,a.5=y,a.1=z"), "Parameter 'a.2' missing");
    assert_eq!(err("b.c.3=x"), "Parameter 'b.c.0' missing");
    assert_eq!(err("a.99999999999999999999=x"), "Parameter 'a.0' missing");
}

#[test]
fn implied_key_takes_a_bare_first_element() {
    let v = parse_keyval("file,filename=x", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "file", "filename": "x"}));
    let v = parse_keyval("qcow2", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "qcow2"}));
}

#[test]
fn implied_key_is_unused_when_the_first_element_has_a_key() {
    let v = parse_keyval("driver=file,filename=x", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "file", "filename": "x"}));
}

#[test]
fn implied_key_applies_only_in_first_position() {
    let e = parse_keyval("filename=x,file", Some("driver")).unwrap_err();
    assert_eq!(e.to_string(), "Expected '=' after parameter 'file'");
    let e = parse_keyval("a,b", Some("driver")).unwrap_err();
    assert_eq!(e.to_string(), "Expected '=' after parameter 'b'");
}

#[test]
fn implied_value_is_verbatim_and_stops_at_the_first_comma() {
    let v = parse_keyval("a.b-c_d", Some("k")).unwrap();
    assert_eq!(v, json!({"k": "a.b-c_d"}));
    // No ",," escaping in the bare value: the comma ends it, and the empty
    // element after it is an invalid key.
    let e = parse_keyval("val,,ue", Some("k")).unwrap_err();
    assert_eq!(e.to_string(), "Invalid parameter ''");
}

#[test]
fn implied_key_needs_a_nonempty_bare_value() {
    let e = parse_keyval(",a=1", Some("k")).unwrap_err();
    assert_eq!(e.to_string(), "Invalid parameter ''");
    let e = parse_keyval("=v", Some("k")).unwrap_err();
    assert_eq!(e.to_string(), "Invalid parameter ''");
}

#[test]
fn explicit_implied_key_later_overrides_the_bare_value() {
    let v = parse_keyval("file,driver=raw", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "raw"}));
}

#[test]
fn help_request_is_an_error_after_a_clean_parse() {
    assert_eq!(err("help"), "Help is not available for this option");
    assert_eq!(err("a=1,?"), "Help is not available for this option");
    let e = parse_keyval("help", Some("qom-type")).unwrap_err();
    assert_eq!(e, KeyvalError::HelpNotAvailable);
    // A syntax error still wins over the help request.
    assert_eq!(err("help,b"), "Expected '=' after parameter 'b'");
    // `help=...` is an ordinary key.
    assert_eq!(kv("help=1").unwrap(), json!({"help": "1"}));
}

#[test]
fn parse_option_detects_json() {
    let v = parse_option(r#"{"driver": "file", "read-only": true}"#, Some("driver")).unwrap();
    assert!(v.is_json());
    assert_eq!(v.value(), &json!({"driver": "file", "read-only": true}));
    let v = parse_option("  {\"a\": {\"b\": [1, 2]}}", None).unwrap();
    assert_eq!(v.into_value(), json!({"a": {"b": [1, 2]}}));
}

#[test]
fn parse_option_falls_back_to_keyval() {
    let v = parse_option("file,filename=a", Some("driver")).unwrap();
    assert!(!v.is_json());
    assert_eq!(
        v,
        OptionValue::Keyval(json!({"driver": "file", "filename": "a"}))
    );
}

#[test]
fn parse_option_reports_bad_json_clearly() {
    let e = parse_option("{\"driver\": }", None).unwrap_err();
    assert!(matches!(e, KeyvalError::Json(_)), "{e:?}");
    assert!(e.to_string().starts_with("JSON parse error, "), "{e}");
    let e = parse_option("{\"a\": 1} x", None).unwrap_err();
    assert!(e.to_string().starts_with("JSON parse error, "), "{e}");
}

#[test]
fn parse_option_keyval_errors_pass_through() {
    let e = parse_option("x", None).unwrap_err();
    assert_eq!(e, KeyvalError::ExpectedEquals("x".into()));
}

#[test]
fn read_value_unescapes_and_splits() {
    assert_eq!(read_value("a,,b,c"), ("a,b".to_string(), "c"));
    assert_eq!(read_value("abc"), ("abc".to_string(), ""));
    assert_eq!(read_value(","), (String::new(), ""));
    assert_eq!(read_value("é,,ü,x"), ("é,ü".to_string(), "x"));
}

#[test]
fn qapi_name_rules() {
    assert_eq!(qapi_name_len("node-name=x"), 9);
    assert_eq!(qapi_name_len("a_b.c"), 3);
    assert_eq!(qapi_name_len("9a"), 0);
    assert_eq!(qapi_name_len("-a"), 0);
    assert_eq!(qapi_name_len("__a.b_c"), 7);
    assert_eq!(qapi_name_len("___x"), 4);
    assert_eq!(qapi_name_len("__ab"), 0);
    assert_eq!(qapi_name_len(""), 0);
}
