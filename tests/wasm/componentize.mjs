// Turns a core module written against the canonical ABI into a component, with jco's bundled
// wasm-tools: embed the WIT world, then `component new`. Used by tests/wasmfixtures.py.
// usage: node componentize.mjs <jco dir> <core.wasm> <world.wit> <world name> <out.wasm>
import { readFile, writeFile } from 'node:fs/promises';

const [, , jcoDir, corePath, witPath, world, outPath] = process.argv;
const { componentEmbed, componentNew } = await import(`${jcoDir}/node_modules/@bytecodealliance/jco/dist/api.js`);
const binary = await readFile(corePath);
// The WIT goes in as source text: jco's sandboxed wasm-tools cannot open host paths.
const witSource = await readFile(witPath, 'utf8');
const embedded = await componentEmbed({ binary, witSource, world });
await writeFile(outPath, await componentNew(embedded, []));
