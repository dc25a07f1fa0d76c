"""Versions in the config, and the traffic between them (torpor/traffic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.catalog import ServiceCatalog
from torpor.clock import ManualClock
from torpor.config import load_config
from torpor.errors import ConfigError, InvalidArgumentError, UnknownServiceError
from torpor.store.sqlite import SqliteStore
from torpor.traffic import TrafficBook, checked_split, promoted
from torpor.workloads.annotations import AnnotationError, service_from_deployment

VERSIONS = """services:
  - name: model
    host: model.test
    paths: [/v1]
    versions:
      - {name: blue, weight: 90, replicas: 2, local: {command: [x]}}
      - {name: green, weight: 10, local: {command: [y]}}
"""


def test_versions_become_services_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text(VERSIONS)
    blue, green = load_config(path).services
    assert (blue.name, blue.version_of, blue.version, blue.weight, blue.replicas) == (
        "model--blue", "model", "blue", 90, 2)
    assert (green.name, green.paths, green.host) == ("model--green", ("/v1",), "model.test")
    catalog = ServiceCatalog([blue, green])
    assert [v.name for v in catalog.versions("model")] == ["model--blue", "model--green"]
    assert catalog.route_name("model.test", "/v1/x") == "model"


@pytest.mark.parametrize(("text", "key", "words"), [
    (VERSIONS.replace("weight: 10", "weight: 0").replace("weight: 90", "weight: 0"),
     "services[0].versions", "every weight is 0"),
    (VERSIONS.replace("name: green", "name: blue"), "services[0].versions[1].name",
     "listed twice"),
    (VERSIONS.replace("name: green", "name: a--b"), "services[0].versions[1].name",
     "may not contain"),
    (VERSIONS.replace("    paths: [/v1]\n", "    paths: [/v1]\n    local: {command: [z]}\n"),
     "services[0].local", "under versions[]"),
    (VERSIONS + "  - {name: model--blue, host: other.test, local: {command: [x]}}\n",
     "services[1].name", "duplicate service name 'model--blue'"),
])
def test_version_errors(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key and words in str(caught.value)


def test_splits_are_checked() -> None:
    assert checked_split(["a", "b"], {"b": 5}) == {"a": 0, "b": 5}
    assert promoted(["a", "b"], "a") == {"a": 100, "b": 0}
    with pytest.raises(InvalidArgumentError, match="unknown version"):
        checked_split(["a"], {"c": 1})
    with pytest.raises(InvalidArgumentError, match="every weight is 0"):
        checked_split(["a", "b"], {"a": 0})


async def test_a_split_survives_a_restart_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "torpor.yaml"
    path.write_text(VERSIONS)
    catalog = ServiceCatalog(load_config(path).services)
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    try:
        book = TrafficBook(catalog, store, ManualClock(1000.0))
        assert book.split("model") == {"blue": 90, "green": 10}
        await book.set("model", {"green": 100}, "promote green")
        again = TrafficBook(catalog, store, ManualClock(2000.0))
        await again.load()
        assert again.split("model") == {"blue": 0, "green": 100}
        assert again.previous("model") == {"blue": 90, "green": 10}
        await again.rollback("model")
        assert again.split("model") == {"blue": 90, "green": 10}
        assert [h["reason"] for h in again.history("model")] == [
            "promote green", "rollback to blue=90 green=10"]
        with pytest.raises(UnknownServiceError):
            await again.set("nope", {"a": 1}, "x")
    finally:
        await store.close()


def deployment(name: str, labels: dict[str, str], annotations: dict[str, str]
               ) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "models",
                         "labels": {"torpor.io/enabled": "true", **labels},
                         "annotations": annotations},
            "spec": {"template": {"spec": {"containers": [
                {"name": "model", "ports": [{"name": "http", "containerPort": 8080}]}]}}}}


def test_deployments_labelled_with_a_version_are_versions_of_one_service() -> None:
    common = {"torpor.io/name": "sentiment", "torpor.io/host": "sentiment.test"}
    v1 = service_from_deployment(deployment("sentiment-v1", {"torpor.io/version": "v1"},
                                            {**common, "torpor.io/weight": "100"}))
    v2 = service_from_deployment(deployment("sentiment-v2", {"torpor.io/version": "v2"},
                                            common))
    assert (v1.name, v1.version_of, v1.weight) == ("sentiment--v1", "sentiment", 100)
    assert (v2.name, v2.weight, v2.kubernetes and v2.kubernetes.deployment) == (
        "sentiment--v2", 0, "sentiment-v2")
    catalog = ServiceCatalog()
    catalog.put(v1, "deployment/models/sentiment-v1")
    catalog.put(v2, "deployment/models/sentiment-v2")  # the same host: its versions
    assert [v.version for v in catalog.versions("sentiment")] == ["v1", "v2"]
    with pytest.raises(AnnotationError, match="is a version's weight"):
        service_from_deployment(deployment("plain", {}, {"torpor.io/weight": "5"}))
