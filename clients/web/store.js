// The page's IndexedDB: the device's keys, its seq counter and seen window, and the
// conversations, one record per business.

const DB = "relayd-web";
const STORES = ["device", "conversations"];

/** @type {Promise<IDBDatabase> | undefined} */
let opened;

function db() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => {
      for (const name of STORES) request.result.createObjectStore(name);
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

/**
 * @param {"device" | "conversations"} store
 * @param {string} key
 * @returns {Promise<any>}
 */
export async function get(store, key) {
  const request = (await db()).transaction(store).objectStore(store).get(key);
  return done(request);
}

/**
 * Write `value` under `key`; resolves once the transaction has committed.
 * @param {"device" | "conversations"} store
 * @param {string} key
 * @param {unknown} value
 */
export async function put(store, key, value) {
  const transaction = (await db()).transaction(store, "readwrite");
  transaction.objectStore(store).put(value, key);
  await new Promise((resolve, reject) => {
    transaction.oncomplete = resolve;
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error);
  });
}

/** @param {IDBRequest} request */
function done(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}
