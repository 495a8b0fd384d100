// SPDX-License-Identifier: MIT
// Validates an AsyncAPI document with @asyncapi/parser (found through
// NODE_PATH): prints every diagnostic on stderr, then one JSON line on
// stdout naming the channels and messages the parser saw.  Exit status 0
// when the document parsed without errors, 1 otherwise.
'use strict';
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

(async () => {
  const text = fs.readFileSync(process.argv[2], 'utf8');
  const { document, diagnostics } = await new Parser().parse(text);
  let errors = 0;
  for (const d of diagnostics) {
    // severity 0 is an error; warnings and hints are shown, not failed on
    if (d.severity === 0) errors++;
    console.error(`${['error', 'warning', 'info', 'hint'][d.severity]}: ` +
                  `${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  if (!document || errors > 0) process.exit(1);
  const out = { version: document.version(), channels: {}, messages: {} };
  for (const ch of document.channels())
    out.channels[ch.id()] = { address: ch.address(),
                              messages: ch.messages().all().map((m) => m.id()) };
  for (const m of document.messages()) {
    out.messages[m.id()] = {
      payload: m.hasPayload() ? m.payload().json() : null,
      headers: m.hasHeaders() ? Object.keys(m.headers().properties()) : [],
      key: m.bindings().has('kafka') ?
        m.bindings().get('kafka').value().key : null,
    };
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e && e.stack || String(e)); process.exit(1); });
