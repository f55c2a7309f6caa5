// A real, certified OpenID Provider (npm oidc-provider) for Tabiji's integration tests only.
// Listens on 127.0.0.1 only; users and clients come from JSON files; passwords and one-time codes
// are checked for real and the login sets amr/acr, so MFA facts can be tested end to end.
//
// node server.mjs --clients clients.json --accounts accounts.json
//                 [--port 0] [--issuer URL] [--tls-cert cert.pem --tls-key key.pem] [--http]
//                 [--name op] [--ttl-id-token 3600]
// Prints one JSON line {"ready":true,"port":N,"issuer":URL} on stdout once listening;
// exits 0 on SIGTERM/SIGINT.

import { randomBytes, generateKeyPairSync, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.IDP_PORT ?? '0' },
    issuer: { type: 'string', default: process.env.IDP_ISSUER },
    clients: { type: 'string', default: process.env.IDP_CLIENTS },
    accounts: { type: 'string', default: process.env.IDP_ACCOUNTS },
    'tls-cert': { type: 'string', default: process.env.IDP_TLS_CERT },
    'tls-key': { type: 'string', default: process.env.IDP_TLS_KEY },
    http: { type: 'boolean', default: false },
    name: { type: 'string', default: 'op' },
    'ttl-id-token': { type: 'string', default: '3600' },
  },
});

function fail(message) {
  process.stderr.write(`test-idp: ${message}\n`);
  process.exit(2);
}

if (!args.clients || !args.accounts) fail('--clients FILE and --accounts FILE are required');
if (!args.http && !(args['tls-cert'] && args['tls-key'])) {
  fail('give --tls-cert and --tls-key (or --http for a plain-HTTP provider)');
}
if (!/^[a-z0-9-]+$/.test(args.name)) fail('--name must match [a-z0-9-]+');

const clients = JSON.parse(readFileSync(args.clients, 'utf8')).map((client) => ({
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  ...client,
}));
const accounts = new Map(
  JSON.parse(readFileSync(args.accounts, 'utf8')).map((account) => [account.sub, account]),
);
const byUsername = new Map([...accounts.values()].flatMap((account) => [
  [account.sub, account],
  ...(account.email ? [[account.email, account]] : []),
  ...(account.username ? [[account.username, account]] : []),
]));

const ACR_PWD = 'urn:tabiji:test:acr:pwd';
const ACR_MFA = 'urn:tabiji:test:acr:mfa';

// -- a tiny in-memory adapter we can enumerate (the admin endpoint finds a user's sessions) -------
const store = new Map(); // `${model}:${id}` -> { payload, expiresAt }
const now = () => Math.floor(Date.now() / 1000);

class MemoryAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, expiresAt: expiresIn ? now() + expiresIn : Infinity });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUid(uid) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload.uid === uid) {
        return this.find(key.slice(this.model.length + 1));
      }
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload.userCode === userCode) {
        return this.find(key.slice(this.model.length + 1));
      }
    }
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = now();
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

function* entriesOf(model) {
  for (const [key, entry] of store) {
    if (key.startsWith(`${model}:`) && entry.expiresAt > now()) yield entry.payload;
  }
}

// -- signing keys: fresh per process, RS256 and ES256 -----------------------------------------
function jwk(type, options, alg) {
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid: `${alg}-${randomBytes(6).toString('hex')}` };
}
const jwks = {
  keys: [jwk('rsa', { modulusLength: 2048 }, 'RS256'), jwk('ec', { namedCurve: 'P-256' }, 'ES256')],
};

// -- HTML: small, self-contained forms; no scripts ---------------------------------------------
const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>`
    + `<body><h1>${escapeHtml(title)}</h1>${body}</body></html>`;
}

function loginPage(uid, clientId, error) {
  return page('Sign in (test IdP)', `${error ? `<p role="alert" id="error">${escapeHtml(error)}</p>` : ''}
<form id="login" method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<p>Client: <span id="client">${escapeHtml(clientId)}</span></p>
<label>Username <input name="username" id="username" required autofocus></label>
<label>Password <input type="password" name="password" id="password" required></label>
<label>One-time code (if enrolled) <input name="otp" id="otp" inputmode="numeric"></label>
<button type="submit" id="submit">Sign in</button>
</form>
<p><a id="abort" href="/interaction/${escapeHtml(uid)}/abort">Cancel</a></p>`);
}

function consentPage(uid, clientId, scopes) {
  return page('Allow access (test IdP)', `<p>Client <span id="client">${escapeHtml(clientId)}</span> asks for: <span id="scopes">${escapeHtml(scopes.join(' '))}</span></p>
<form id="consent" method="post" action="/interaction/${escapeHtml(uid)}/confirm">
<button type="submit" id="allow">Allow</button>
</form>
<p><a id="abort" href="/interaction/${escapeHtml(uid)}/abort">Deny</a></p>`);
}

function sameSecret(given, expected) {
  const a = Buffer.from(String(given ?? ''));
  const b = Buffer.from(String(expected ?? ''));
  return a.length === b.length && timingSafeEqual(a, b);
}

// -- the provider ------------------------------------------------------------------------------
const cookieKeys = [randomBytes(32).toString('base64url')];

function buildProvider(issuer) {
  return new Provider(issuer, {
    adapter: MemoryAdapter,
    clients,
    jwks,
    async findAccount(_ctx, id) {
      const account = accounts.get(id);
      if (!account) return undefined;
      return {
        accountId: id,
        async claims() {
          const claims = {
            sub: id,
            email: account.email,
            email_verified: account.email_verified,
            name: account.name,
            preferred_username: account.username,
            groups: account.groups,
            // An Entra-ID-like group overage: the groups are only "elsewhere" (distributed claim).
            _claim_names: account.claim_names,
            _claim_sources: account.claim_sources,
            hasgroups: account.hasgroups,
          };
          for (const key of Object.keys(claims)) if (claims[key] == null) delete claims[key];
          return claims;
        },
      };
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub', 'acr', 'amr', 'auth_time'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups', 'hasgroups'],
    },
    acrValues: [ACR_PWD, ACR_MFA],
    // Scope claims (email, name, groups) in the ID token too, as Entra ID and Google do.
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    pkce: { required: () => true }, // S256 is the only method oidc-provider supports
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    cookies: {
      keys: cookieKeys,
      // Cookies are per host, not per port: distinct names keep two providers (and the gateway)
      // on 127.0.0.1 from overwriting each other's cookies in one browser or cookie jar.
      names: {
        session: `${args.name}-session`,
        interaction: `${args.name}-interaction`,
        resume: `${args.name}-resume`,
      },
    },
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: { enabled: true },
      backchannelLogout: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: false },
      userinfo: { enabled: true },
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    ttl: {
      AccessToken: 600,
      AuthorizationCode: 60,
      IdToken: Number(args['ttl-id-token']),
      RefreshToken: 24 * 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 24 * 3600,
    },
    // oidc-provider refuses outgoing requests (back-channel logout) to special-use addresses such
    // as 127.0.0.1 (SSRF protection). Every relying party of this test provider is on loopback,
    // so its requests go through the plain fetch; the RP's TLS certificate is still verified
    // (start the process with NODE_EXTRA_CA_CERTS=<test CA>).
    fetch: (url, { dispatcher: _ignored, ...options }) => globalThis.fetch(url, options),
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error (test IdP)', `<pre id="error">${escapeHtml(JSON.stringify(out))}</pre>`);
    },
  });
}

// -- interaction routes (login, consent, abort) -------------------------------------------------
async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, type, body) {
  res.writeHead(status, {
    'content-type': type,
    'cache-control': 'no-store',
    // form-action also governs the redirect after a post (CSP3): consent sends the browser back to
    // the relying party, which in these tests lives on loopback.
    'content-security-policy': "default-src 'none'; form-action 'self' https://127.0.0.1:* https://localhost:*; frame-ancestors 'none'",
  });
  res.end(body);
}

async function interaction(provider, req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, 'text/plain', 'interaction mismatch');
  const { prompt, params } = details;

  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, params.client_id));
    if (prompt.name === 'consent') {
      return send(res, 200, 'text/html; charset=utf-8', consentPage(uid, params.client_id, String(params.scope).split(' ')));
    }
    return send(res, 400, 'text/plain', `unknown prompt ${prompt.name}`);
  }

  if (req.method === 'GET' && action === 'abort') {
    return provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'the user cancelled',
    }, { mergeWithLastSubmission: false });
  }

  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const account = byUsername.get(form.get('username') ?? '');
    const otp = form.get('otp') ?? '';
    let error;
    if (!account || !sameSecret(form.get('password'), account.password)) {
      error = 'Invalid username or password.';
    } else if (otp && !(account.mfa && sameSecret(otp, account.otp))) {
      error = 'Invalid one-time code.';
    }
    if (error) return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, params.client_id, error));
    const mfa = Boolean(otp);
    return provider.interactionFinished(req, res, {
      login: {
        accountId: account.sub,
        amr: mfa ? ['pwd', 'otp'] : ['pwd'],
        acr: mfa ? ACR_MFA : ACR_PWD,
        remember: true,
      },
    }, { mergeWithLastSubmission: false });
  }

  if (req.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    await readForm(req);
    const { accountId } = details.session;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    if (missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, {
      consent: details.grantId ? {} : { grantId },
    }, { mergeWithLastSubmission: true });
  }

  return send(res, 405, 'text/plain', 'method not allowed');
}

// -- test-only admin: end a user's sessions at the provider, as an administrator would -----------
// POST /_test/logout {"sub": "...", "notify": true} (loopback only): every session of that user is
// destroyed, every grant (so every refresh token) revoked, and with notify each client that has a
// backchannel_logout_uri receives a real logout token (OIDC Back-Channel Logout 1.0).
async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

async function logoutUser(provider, { sub, notify = true }) {
  const result = { sessions: 0, grants: 0, notified: [], errors: [] };
  for (const session of [...entriesOf('Session')]) {
    if (session.accountId !== sub) continue;
    result.sessions += 1;
    for (const [clientId, authorization] of Object.entries(session.authorizations ?? {})) {
      const client = await provider.Client.find(clientId);
      if (notify && client?.backchannelLogoutUri) {
        try {
          await client.backchannelLogout(sub, authorization.sid);
          result.notified.push({ client_id: clientId, sid: authorization.sid });
        } catch (error) {
          result.errors.push({ client_id: clientId, error: String(error.message ?? error) });
        }
      }
    }
    await new MemoryAdapter('Session').destroy(session.jti);
  }
  for (const grant of [...entriesOf('Grant')]) {
    if (grant.accountId !== sub) continue;
    result.grants += 1;
    for (const model of ['AccessToken', 'AuthorizationCode', 'RefreshToken']) {
      await new MemoryAdapter(model).revokeByGrantId(grant.jti);
    }
    await new MemoryAdapter('Grant').destroy(grant.jti);
  }
  return result;
}

// -- the server --------------------------------------------------------------------------------
let provider;
let providerCallback;

async function handler(req, res) {
  try {
    const url = new URL(req.url, 'http://x');
    const match = url.pathname.match(/^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/);
    if (match) return await interaction(provider, req, res, match[1], match[2]);
    if (url.pathname === '/_test/logout' && req.method === 'POST') {
      const remote = req.socket.remoteAddress;
      if (remote !== '127.0.0.1' && remote !== '::1' && remote !== '::ffff:127.0.0.1') {
        return send(res, 403, 'text/plain', 'loopback only');
      }
      const result = await logoutUser(provider, await readJson(req));
      return send(res, 200, 'application/json', JSON.stringify(result));
    }
    if (url.pathname === '/_test/health') return send(res, 200, 'application/json', '{"ok":true}');
    return providerCallback(req, res);
  } catch (error) {
    process.stderr.write(`test-idp: ${error.stack ?? error}\n`);
    if (!res.headersSent) send(res, 400, 'text/plain', `error: ${error.name}: ${error.message}`);
    else res.end();
  }
}

const server = args.http
  ? http.createServer(handler)
  : https.createServer({ cert: readFileSync(args['tls-cert']), key: readFileSync(args['tls-key']) }, handler);
server.keepAliveTimeout = 5000;

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = args.issuer ?? `${args.http ? 'http' : 'https'}://127.0.0.1:${port}`;
  provider = buildProvider(issuer);
  provider.on('server_error', (_ctx, error) => process.stderr.write(`test-idp server_error: ${error.stack}\n`));
  provider.on('backchannel.error', (_client, error) => process.stderr.write(`test-idp backchannel.error: ${error.message}\n`));
  providerCallback = provider.callback();
  process.stdout.write(`${JSON.stringify({ ready: true, port, issuer, name: args.name })}\n`);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
