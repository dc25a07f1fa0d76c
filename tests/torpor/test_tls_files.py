"""The gateway's certificate files are checked when the config is read: a key of another
certificate, or a file that is not PEM, is a config error naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from torpor.certs import issue, make_ca
from torpor.config import load_config
from torpor.errors import ConfigError


def files(tmp_path: Path) -> dict[str, Path]:
    _, ca_cert, ca_key = make_ca(days=1)
    out = {}
    for stem in ("a", "b"):
        pair = issue(ca_cert, ca_key, f"{stem}.test", [f"{stem}.test"], client=False, days=1)
        out[stem], out[f"{stem}-key"] = tmp_path / f"{stem}.pem", tmp_path / f"{stem}-key.pem"
        out[stem].write_bytes(pair.cert)
        out[f"{stem}-key"].write_bytes(pair.key)
    (tmp_path / "junk.pem").write_text("not a certificate")
    out["junk"] = tmp_path / "junk.pem"
    return out


@pytest.mark.parametrize(("cert", "key", "at", "words"), [
    ("a", "b-key", "gateway.tls", "is not the key of the certificate"),
    ("junk", "a-key", "gateway.tls", "is not a PEM certificate"),
    ("a", "junk", "gateway.tls", "is not an unencrypted PEM private key"),
])
def test_a_bad_certificate_pair_is_a_config_error(tmp_path: Path, cert: str, key: str,
                                                 at: str, words: str) -> None:
    f = files(tmp_path)
    path = tmp_path / "torpor.yaml"
    path.write_text(f"gateway: {{tls: {{cert: {f[cert]}, key: {f[key]}}}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == at and words in str(caught.value)


def test_sni_names_are_given_once(tmp_path: Path) -> None:
    f = files(tmp_path)
    path = tmp_path / "torpor.yaml"
    path.write_text(f"gateway: {{tls: {{cert: {f['a']}, key: {f['a-key']}, sni: ["
                    f"{{hosts: [b.test], cert: {f['b']}, key: {f['b-key']}}}, "
                    f"{{hosts: [b.test], cert: {f['a']}, key: {f['a-key']}}}]}}}}\n")
    with pytest.raises(ConfigError, match=r"already has the certificate of gateway\.tls\.sni"):
        load_config(path)
    path.write_text(f"gateway: {{tls: {{cert: {f['a']}, key: {f['a-key']}, http2: false, "
                    f"sni: [{{hosts: ['*.b.test'], cert: {f['b']}, key: {f['b-key']}}}]}}}}\n")
    tls = load_config(path).gateway.tls
    assert tls is not None and not tls.http2 and tls.sni[0].hosts == ("*.b.test",)
