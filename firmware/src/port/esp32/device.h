/* The ESP32-S3 port: what main.c, net.c and settings.c share.
 *
 * Board bounds (override with -D in platformio.ini build_flags):
 *   PROPLET_WASM_ARENA_BYTES  WAMR's arena: modules, instances, stacks, linear memories
 *   PROPLET_DEVICE_SLOTS      concurrent tasks (each has a worker task of WORKER_STACK_BYTES)
 *   PROPLET_DEVICE_MODULE_MAX largest module accepted, inline or in chunks
 *   PROPLET_DEVICE_RX_MAX     largest MQTT message taken whole; larger ones are refused by name
 */
#ifndef PROPLET_DEVICE_H
#define PROPLET_DEVICE_H

#include <stdbool.h>
#include <stddef.h>

#include "../../core/proplet.h"
#include "../../core/provision.h"

#ifndef PROPLET_WASM_ARENA_BYTES
#define PROPLET_WASM_ARENA_BYTES (160 * 1024)
#endif
#ifndef PROPLET_DEVICE_SLOTS
#define PROPLET_DEVICE_SLOTS 4
#endif
#ifndef PROPLET_DEVICE_MODULE_MAX
#define PROPLET_DEVICE_MODULE_MAX (48 * 1024)
#endif
#ifndef PROPLET_DEVICE_RX_MAX
#define PROPLET_DEVICE_RX_MAX (24 * 1024)
#endif
#ifndef PROPLET_WASM_STACK_BYTES
#define PROPLET_WASM_STACK_BYTES (8 * 1024)
#endif
#ifndef PROPLET_WASM_MEMORY_MAX
#define PROPLET_WASM_MEMORY_MAX (64 * 1024)
#endif
#define WORKER_STACK_BYTES (10 * 1024)

/* settings.c: NVS and the serial provisioning console */
bool settings_nvs_load(proplet_settings_t *settings);
bool settings_nvs_save(const proplet_settings_t *settings, char *err, size_t err_len);
/* Serve the provisioning line protocol on the console UART (runs for the device's lifetime). */
void provisioning_start(void);

/* net.c: Wi-Fi station and esp-mqtt */
void wifi_start(const proplet_settings_t *settings);
bool wifi_address(char *out, size_t len);
bool mqtt_start(const proplet_settings_t *settings, proplet_t *proplet);
bool mqtt_send(const char *topic, const char *payload, size_t len);

#endif
