"""Extraction: every reply shape of the provider contract (section 2), as a table. No I/O."""

from __future__ import annotations

import base64

import pytest

from pipeline.extract import decode_data_uri, extract_images

SIGNED = "https://cdn.example/abc.png?Expires=1700000000&Signature=a%2Bb%2Fc%3D&X-Id=1"
PNG64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 60).decode()
DATA = f"data:image/png;base64,{PNG64}"


def chat(message: dict) -> dict:
    return {"choices": [{"index": 0, "finish_reason": "stop", "message": message}]}


CASES = {
    "markdown signed URL keeps its query": (chat({"content": f"Here: ![image]({SIGNED})"}), [SIGNED]),
    "markdown data URI": (chat({"content": f"![img]({DATA})"}), [DATA]),
    "two markdown data URIs with text between": (
        chat({"content": f"one ![a]({DATA}) two ![b](data:image/jpeg;base64,/9j/4AAQ)"}),
        [DATA, "data:image/jpeg;base64,/9j/4AAQ"],
    ),
    "bare data URI in text": (chat({"content": f"result {DATA} done"}), [DATA]),
    "message.images with empty content": (
        chat({"content": "", "images": [{"type": "image_url", "image_url": {"url": SIGNED}}]}),
        [SIGNED],
    ),
    "content parts, raw base64 without data: prefix": (
        chat(
            {"content": [{"type": "text", "text": "ok"}, {"type": "image_url", "image_url": {"url": PNG64}}]}
        ),
        [f"data:image/*;base64,{PNG64}"],
    ),
    "content parts with URL": (
        chat({"content": [{"type": "image_url", "image_url": {"url": SIGNED}}]}),
        [SIGNED],
    ),
    "message.image[].data raw base64": (
        chat({"content": None, "image": [{"data": "AAAA"}]}),
        ["data:image/*;base64,AAAA"],
    ),
    "native Gemini inlineData": (
        {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}}]},
        ["data:image/png;base64,AAAA"],
    ),
    "native Gemini inline_data snake case": (
        {
            "candidates": [
                {"content": {"parts": [{"inline_data": {"mime_type": "image/jpeg", "data": "BBBB"}}]}}
            ]
        },
        ["data:image/jpeg;base64,BBBB"],
    ),
    "images in content and images[] both collected, in order": (
        chat({"content": f"![a]({SIGNED})", "images": [{"image_url": {"url": "https://cdn.example/2.png"}}]}),
        [SIGNED, "https://cdn.example/2.png"],
    ),
    "identical URL strings once, index fields ignored": (
        chat(
            {
                "content": f"![a]({SIGNED}) ![b]({SIGNED})",
                "images": [{"index": 0, "image_url": {"url": SIGNED}}],
            }
        ),
        [SIGNED],
    ),
    "two images with the same index field are both kept": (
        chat(
            {
                "content": "",
                "images": [
                    {"index": 0, "image_url": {"url": "https://h/1.png"}},
                    {"index": 0, "image_url": {"url": "https://h/2.png"}},
                ],
            }
        ),
        ["https://h/1.png", "https://h/2.png"],
    ),
    "streaming delta shape": ({"choices": [{"delta": {"content": f"![x]({SIGNED})"}}]}, [SIGNED]),
    "markdown with a title": (chat({"content": f'![x]({SIGNED} "kitten")'}), [SIGNED]),
    "plain text only": (chat({"content": "I drew a kitten for you."}), []),
    "content null": (chat({"content": None}), []),
    "choices empty": ({"choices": []}, []),
    "markdown link that is not an image": (chat({"content": "[docs](https://x.example)"}), []),
    "not a dict": (["error"], []),
}


@pytest.mark.parametrize(("reply", "expected"), CASES.values(), ids=CASES.keys())
def test_extract_images(reply: dict, expected: list[str]) -> None:
    assert extract_images(reply) == expected


LENIENT = {
    "standard": base64.b64encode(b"hello world!").decode(),
    "missing padding": base64.b64encode(b"hello world").decode().rstrip("="),
    "url-safe alphabet": base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 5).decode(),
    "whitespace and newlines": "aGVs\nbG8g d29y\r\nbGQ=",
}


@pytest.mark.parametrize("payload", LENIENT.values(), ids=LENIENT.keys())
def test_decode_data_uri_is_lenient(payload: str) -> None:
    decoded = decode_data_uri(f"data:image/png;base64,{payload}")
    assert decoded in (b"hello world!", b"hello world", b"\xfb\xff\xfe" * 5)


@pytest.mark.parametrize("uri", ["data:image/png,notbase64", "data:image/png;base64,@@@@", "nocomma"])
def test_decode_data_uri_rejects_garbage(uri: str) -> None:
    with pytest.raises(ValueError):
        decode_data_uri(uri)
