// Server-Sent Events over fetch().
//
// EventSource cannot send an Authorization header, and the token must never go in the URL,
// so the stream is read with fetch() and a ReadableStream and parsed here, as the HTML
// standard's event-stream rules say: lines end in \r\n, \n or \r; "event:", "data:"
// (several joined by \n) and "id:" fill the event; a blank line dispatches it; lines
// starting with ":" (the server's keep-alive pings) are comments.

import { ApiError, errorOf, headers, networkError } from "./api.js";

export class SseParser {
  constructor(lastEventId = "") {
    this.buffer = "";
    this.type = "";
    this.data = [];
    this.lastEventId = lastEventId; // kept across events, as the standard says
  }

  // Feed the next piece of decoded text; returns the events it completed.
  push(text) {
    this.buffer += text;
    // A "\r" at the very end may be the first half of "\r\n": wait for the next piece.
    const eol = /\r\n|\r(?!$)|\n/g;
    const events = [];
    let start = 0;
    let match;
    while ((match = eol.exec(this.buffer)) !== null) {
      const event = this.line(this.buffer.slice(start, match.index));
      if (event) {
        events.push(event);
      }
      start = eol.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(line) {
    if (line === "") {
      return this.dispatch();
    }
    if (line.startsWith(":")) {
      return null;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    if (field === "event") {
      this.type = value;
    } else if (field === "data") {
      this.data.push(value);
    } else if (field === "id" && !value.includes("\0")) {
      this.lastEventId = value;
    }
    // "retry" and unknown fields are ignored: reconnecting is follow()'s own backoff.
    return null;
  }

  dispatch() {
    const event = this.data.length
      ? { type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId }
      : null;
    this.type = "";
    this.data = [];
    return event;
  }
}

const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;

// Read the stream at `href` until stop() is called, reconnecting after a drop with capped,
// jittered backoff and the Last-Event-ID of the last event seen (the server replays what
// was missed, or sends "reset"). Callbacks:
//   onEvent({type, data, id})           every event
//   onState("connected" | "waiting", error?, waitMs?)
//   onDenied(error)                     the token was refused: no retry, another token may help
export function follow(href, { onEvent, onState, onDenied }) {
  const stopper = new AbortController();
  let lastEventId = "";
  let failures = 0;

  async function readOnce() {
    const sent = headers({ Accept: "text/event-stream" });
    if (lastEventId) {
      sent["Last-Event-ID"] = lastEventId;
    }
    let response;
    try {
      response = await fetch(href, { headers: sent, cache: "no-store", signal: stopper.signal });
    } catch (err) {
      throw stopper.signal.aborted ? err : networkError(err);
    }
    if (!response.ok) {
      throw await errorOf(response);
    }
    failures = 0;
    onState("connected");
    const parser = new SseParser(lastEventId);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        throw new ApiError(0, "stream_ended", "the stream ended");
      }
      for (const event of parser.push(value)) {
        lastEventId = event.id;
        onEvent(event);
      }
    }
  }

  async function run() {
    while (!stopper.signal.aborted) {
      try {
        await readOnce();
      } catch (err) {
        if (stopper.signal.aborted) {
          return;
        }
        if (err instanceof ApiError && err.wantsToken) {
          onDenied(err);
          return;
        }
        const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** failures);
        const wait = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
        failures += 1;
        const error = err instanceof ApiError ? err : networkError(err);
        onState("waiting", error, wait);
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, wait);
          const wake = () => {
            clearTimeout(timer);
            resolve();
          };
          stopper.signal.addEventListener("abort", wake, { once: true });
        });
      }
    }
  }

  run();
  return () => stopper.abort();
}
