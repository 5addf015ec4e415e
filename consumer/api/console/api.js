// The one way the console talks to the sidecar's /v1 API.
//
// The bearer token lives in sessionStorage (this tab only, gone when it closes) and goes
// out only in the Authorization header: never in a URL, where proxies, logs and the
// browser's history would keep it.

const TOKEN_KEY = "fleet-console-token";

export function hasToken() {
  return Boolean(sessionStorage.getItem(TOKEN_KEY));
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// An error the API answered ({"error": {"code", "message"}}), or one of the console's own
// codes: network_error (no answer at all), not_json (an answer that is not the API's).
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  // Another token may help: none or a wrong one (401), one without the scope (403), or
  // a sidecar that refuses /v1 until tokens are configured (503 auth_not_configured).
  get wantsToken() {
    return this.status === 401 || this.status === 403 || this.code === "auth_not_configured";
  }
}

export function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

// The API's error from a failed response, with its own message whenever it sent one.
export async function errorOf(response) {
  const fallback = `the sidecar answered ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.code) {
      return new ApiError(response.status, body.error.code, body.error.message || fallback);
    }
  } catch {
    // not JSON: a proxy's page, say; the status is all there is to tell
  }
  return new ApiError(response.status, "http_error", fallback);
}

export function networkError(err) {
  return new ApiError(0, "network_error", `the sidecar did not answer (${err.message})`);
}

// A URL of this origin: path segments are the caller's (encode ids with encodeURIComponent),
// query values are encoded here; empty ones are left out.
export function url(path, query = {}) {
  const built = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") {
      built.searchParams.set(name, String(value));
    }
  }
  return built;
}

// GET (or POST) a /v1 path and return its JSON body; throws ApiError on anything else.
export async function api(path, { query = {}, method = "GET" } = {}) {
  let response;
  try {
    response = await fetch(url(path, query), {
      method,
      headers: headers({ Accept: "application/json" }),
      cache: "no-store",
    });
  } catch (err) {
    throw networkError(err);
  }
  if (!response.ok) {
    throw await errorOf(response);
  }
  try {
    return await response.json();
  } catch {
    throw new ApiError(response.status, "not_json", "the sidecar's answer was not JSON");
  }
}
