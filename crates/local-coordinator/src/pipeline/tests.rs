use super::*;

fn parse(text: &str) -> Pipeline {
    parse_pipeline(text, ".gitlab-ci.yml").unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn durations() {
    assert_eq!(parse_duration("3600"), Ok(3600));
    assert_eq!(parse_duration("1h 30m"), Ok(5400));
    assert_eq!(parse_duration("2 hours and 5 minutes"), Ok(7500));
    assert_eq!(parse_duration("1 week"), Ok(604800));
    assert!(parse_duration("soon").is_err());
}

#[test]
fn default_stages_wrap_pre_and_post() {
    let pipeline = parse("job:\n  script: echo hi\n");
    assert_eq!(
        pipeline.stages,
        [".pre", "build", "test", "deploy", ".post"]
    );
    assert_eq!(pipeline.jobs[0].stage, "test");
}

#[test]
fn selecting_jobs_pulls_in_what_they_need() {
    let pipeline = parse(
        "stages: [a, b, c]\nbuild:\n  stage: a\n  parallel: 2\n  script: x\nother:\n  stage: a\n  script: x\ntest:\n  stage: b\n  needs: [build]\n  script: x\ndeploy:\n  stage: c\n  needs: [test]\n  script: x\n",
    );
    let names = |pipeline: &Pipeline| -> Vec<String> {
        pipeline.jobs.iter().map(|job| job.name.clone()).collect()
    };
    let selected = pipeline.select(&["deploy".to_owned()]).expect("known job");
    assert_eq!(
        names(&selected),
        ["build 1/2", "build 2/2", "test", "deploy"]
    );
    let selected = pipeline.select(&["build".to_owned()]).expect("base name");
    assert_eq!(names(&selected), ["build 1/2", "build 2/2"]);
    let error = pipeline
        .select(&["nope".to_owned(), "other".to_owned()])
        .expect_err("unknown job");
    assert_eq!(error, "no job named nope in this pipeline");
}

#[test]
fn command_line_variables_and_files() {
    assert_eq!(
        parse_assignment("KEY=a=b"),
        Ok(("KEY".to_owned(), "a=b".to_owned()))
    );
    assert!(parse_assignment("1KEY=x").is_err());
    assert!(parse_assignment("no-equals").is_err());
    let dotenv = parse_variables_file(
        "# comment\nexport A=\"quoted\"\nB='single'\nC=plain\n",
        "vars.env",
    )
    .expect("valid file");
    let pairs: Vec<(&str, &str)> = dotenv
        .iter()
        .map(|variable| (variable.key.as_str(), variable.value.as_str()))
        .collect();
    assert_eq!(pairs, [("A", "quoted"), ("B", "single"), ("C", "plain")]);
    let yaml = parse_variables_file(
        "TOKEN:\n  value: s3cr3t-value\n  masked: true\nPLAIN: 1\n",
        "vars.yml",
    )
    .expect("valid file");
    assert!(yaml[0].masked && yaml[0].value == "s3cr3t-value");
    assert_eq!(
        (yaml[1].key.as_str(), yaml[1].value.as_str()),
        ("PLAIN", "1")
    );
    let error =
        parse_variables_file("A=1\nbad line with s3cr3t\n", "vars.env").expect_err("invalid");
    assert!(error.starts_with("vars.env:2:"), "{error}");
    assert!(
        !error.contains("s3cr3t"),
        "values never appear in errors: {error}"
    );
}

#[test]
fn user_variables_win_in_rules() {
    let project = Project::detached(std::path::Path::new("."));
    let user = [Variable::public("DEPLOY", "yes")];
    let text =
        "variables:\n  DEPLOY: \"no\"\njob:\n  rules:\n    - if: $DEPLOY == \"yes\"\n  script: x\n";
    let pipeline = parse_pipeline_with(text, "f.yml", &project, &user).expect("valid");
    assert_eq!(pipeline.jobs.len(), 1);
    let pipeline = parse_pipeline_with(text, "f.yml", &project, &[]).expect("valid");
    assert_eq!(pipeline.excluded[0].reason, "no rule matches");
}
