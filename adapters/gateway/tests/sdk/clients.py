"""Drives one keypool gateway that serves both pools with the official SDKs.

Every client has max_retries=0: a 429 that reached the SDK would raise RateLimitError.
argv: gateway base URL (http://127.0.0.1:PORT). Prints one "ok ..." line per step.
"""
import sys

import anthropic
import openai

base = sys.argv[1]
oai = openai.OpenAI(base_url=base + "/openai/v1", api_key="unused-by-the-gateway", max_retries=0)
ant = anthropic.Anthropic(base_url=base, api_key="unused-by-the-gateway", max_retries=0)
messages = [{"role": "user", "content": "hi"}]

completion = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
assert completion.choices[0].message.content, completion
print("ok chat.completions.create", flush=True)

text = ""
done = False
for chunk in oai.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.choices and chunk.choices[0].finish_reason:
        done = True
assert text and done, (text, done)
print("ok chat.completions.create(stream=True)", flush=True)

kinds = []
for event in oai.responses.create(model="gpt-4o-mini", input="hi", stream=True):
    kinds.append(event.type)
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert "response.output_text.delta" in kinds, kinds
print("ok responses.create(stream=True)", flush=True)

message = ant.messages.create(model="claude-sonnet-4-5", max_tokens=32, messages=messages)
assert message.content[0].text, message
print("ok messages.create", flush=True)

with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=32, messages=messages) as stream:
    streamed = "".join(stream.text_stream)
assert streamed, streamed
print("ok messages.stream", flush=True)

try:
    for chunk in oai.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True):
        pass
except openai.APIError as e:
    assert not isinstance(e, openai.RateLimitError), e
    assert "incomplete" in str(e), e
    print("ok mid-stream reset raised APIError:", type(e).__name__, flush=True)
else:
    raise AssertionError("a stream that reset mid-way ended without an error")
