// Small helpers shared by the example pages: no dependencies, plain fetch and streams.

/** The gateway's base URL from the page's field, without a trailing slash. */
function gatewayUrl() {
  return document.getElementById("gateway").value.trim().replace(/\/+$/, "");
}

/** Show a status line; errors in red. */
function setStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

/** The Authorization header for the token in the page's #token field. */
function authorization() {
  return { "Authorization": `Bearer ${document.getElementById("token").value.trim()}` };
}

/** An error answer from the gateway; `status` lets a page tell, say, 409 from the rest. */
class GatewayError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/**
 * fetch() a gateway path. A refused or failed answer throws a GatewayError carrying the
 * message of gogpt's OpenAI-shaped JSON error; an abort (Stop) is rethrown as it is.
 */
async function gatewayFetch(path, init = {}) {
  const url = `${gatewayUrl()}${path}`;
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    // The browser hides why (refused, DNS, CORS): name the likely causes instead.
    throw new GatewayError(`Cannot reach ${url}: is the gateway running, and is its URL right?`, 0);
  }
  if (!response.ok) throw new GatewayError(await errorMessage(response), response.status);
  return response;
}

/** The message of gogpt's (OpenAI-shaped) JSON error, or the HTTP status when there is none. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || body.detail || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** Mint a token with POST /token, so the key stays out of URLs and logs. */
async function mintToken(id, hour, key) {
  const response = await gatewayFetch("/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id, hour: Number(hour), key }),
  });
  return (await response.json()).token;
}

const CUT_OFF = "The answer was cut off: the connection broke before it finished.";

/**
 * Read a text/event-stream body, calling onData with each event's data as it arrives.
 * Resolves true when the stream ended after `data: [DONE]`, false when it ended without it.
 * Events and even CR LF pairs may be split across network chunks, so an unfinished event
 * waits for the rest. A broken connection throws CUT_OFF; an abort (Stop) is rethrown.
 */
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let finished = false;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      throw error.name === "AbortError" ? error : new Error(CUT_OFF);
    }
    if (chunk.done) return finished;
    pending = (pending + chunk.value).replace(/\r\n/g, "\n");
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const lines = pending.slice(0, end).split("\n");
      pending = pending.slice(end + 2);
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))  // one space is part of the syntax
        .join("\n");
      if (data === "[DONE]") finished = true;
      else if (data) onData(data);
    }
  }
}
