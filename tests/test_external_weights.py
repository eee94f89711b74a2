"""External weights: save_weights_external exports the adapter in peft's format (encrypted with
age where asked), and get_external_weights_urls gives signed URLs a plain HTTP GET fetches from
the server's console port; what they fetch loads in peft with the server's own logprobs."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pyrage
import pytest
import torch
from server_process import running_server

from tinker_client import BadRequestError, ConflictError, ServiceClient, TinkerError, types
from tinker_server.console.signed_urls import UrlSigner

from .conftest import BASE_MODEL
from .helpers import peft_model, ragged_batch, reference_logprobs

DATA = ragged_batch(seed=3, lengths=[9, 14])


@pytest.fixture(scope="module")
def console_service(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("external-weights"), ["--console-port", "0"]) as address:
        client = ServiceClient(base_url=address)
        yield client
        client.close()


@pytest.fixture(scope="module")
def trained(console_service):
    training = console_service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
    training.forward_backward(DATA, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return training


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def download(urls: dict[str, str], directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, url in urls.items():
        (directory / name).write_bytes(fetch(url))
    return directory


def test_external_weights_download_with_plain_gets_and_load_in_peft(console_service, trained, tmp_path):
    path = trained.save_weights_external("final", ttl_seconds=7200).result().path
    assert path == f"tinker://{trained.model_id}/external_weights/final"
    rest = console_service.create_rest_client()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(trained.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external" and listed[path].expires_at is not None
    urls = rest.get_external_weights_urls(path).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert urls.expires.timestamp() > listed[path].time.timestamp() + 3000
    model = peft_model(download(urls.urls, tmp_path / "adapter")).eval()
    served = trained.forward(DATA, "cross_entropy").result().loss_fn_outputs
    with torch.no_grad():
        for datum, output in zip(DATA, served, strict=True):
            expected = reference_logprobs(model, datum)
            torch.testing.assert_close(output["logprobs"].to_torch(), expected, atol=1e-4, rtol=0)


def test_an_encrypted_export_decrypts_to_the_plain_files(console_service, trained):
    rest = console_service.create_rest_client()
    identity = pyrage.x25519.Identity.generate()
    plain = trained.save_weights_external("plain").result().path
    sealed = trained.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())]).result()
    plain_files = {name: fetch(url) for name, url in rest.get_external_weights_urls(plain).result().urls.items()}
    sealed_urls = rest.get_external_weights_urls(sealed.path).result().urls
    assert set(sealed_urls) == {f"{name}.age" for name in plain_files}
    for name, content in plain_files.items():
        assert pyrage.decrypt(fetch(sealed_urls[f"{name}.age"]), [identity]) == content


def test_a_url_works_only_as_signed_and_while_its_checkpoint_exists(console_service, trained):
    rest = console_service.create_rest_client()
    path = trained.save_weights_external("short-lived").result().path
    url = rest.get_external_weights_urls(path).result().urls["adapter_config.json"]
    expires = url.split("expires=")[1].split("&")[0]
    tampered = [
        url.replace("adapter_config.json", "adapter_model.safetensors"),  # another file, this one's signature
        url.replace("signature=", "signature=0"),
        url.split("?")[0],
        url.replace(f"expires={expires}", "expires=%C2%B2"),  # a digit to str.isdigit, not to int()
        url.replace("signature=", "signature=%C3%A9"),  # not ASCII
    ]
    for attempt in tampered:
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(attempt)
        assert refused.value.code == 403
    assert fetch(url)
    rest.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(urllib.error.HTTPError) as gone:
        fetch(url)
    assert gone.value.code == 404


def test_a_signature_expires():
    signer = UrlSigner(lifetime_seconds=-1)
    query, _ = signer.query("/external/run/name/file")
    fields = dict(part.split("=") for part in query.split("&"))
    assert not signer.allows("/external/run/name/file", fields["expires"], fields["signature"])
    fresh = UrlSigner(lifetime_seconds=60)
    fields = dict(part.split("=") for part in fresh.query("/a")[0].split("&"))
    assert fresh.allows("/a", fields["expires"], fields["signature"])
    assert not fresh.allows("/b", fields["expires"], fields["signature"])


def test_bad_exports_are_refused_naming_the_field(console_service, trained):
    key = str(pyrage.x25519.Identity.generate().to_public())
    with pytest.raises(BadRequestError, match=r"save_weights_external\.age_encryption_recipients\[1\]: 'age1nope'"):
        trained.save_weights_external("bad-key", age_encryption_recipients=[key, "age1nope"]).result()
    with pytest.raises(BadRequestError, match=r"age_encryption_recipients: 11 recipients; at most 10"):
        trained.save_weights_external("many", age_encryption_recipients=[key] * 11).result()
    path = trained.save_weights_external("once").result().path
    with pytest.raises(ConflictError, match="already exists"):
        trained.save_weights_external("once").result()
    with pytest.raises(TinkerError, match="export for use elsewhere"):
        console_service.create_sampling_client(model_path=path).result().sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    with pytest.raises(TinkerError, match="export for use elsewhere"):
        console_service.create_rest_client().copy_weights(path).result()
    state = trained.save_state("state").result().path
    with pytest.raises(BadRequestError, match="is not external weights"):
        console_service.create_rest_client().get_external_weights_urls(state).result()


def test_without_a_console_there_are_no_urls_and_the_error_says_how(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
    path = training.save_weights_external("no-console").result().path
    with pytest.raises(TinkerError, match="--console-port"):
        service.create_rest_client().get_external_weights_urls(path).result()
