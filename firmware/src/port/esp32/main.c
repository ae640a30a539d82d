/* The ESP32-S3 proplet: NVS settings and serial provisioning, Wi-Fi and MQTT, WAMR, and one
 * worker task per slot. With PROPLET_BENCHMARK (the esp32-s3-bench environment) it runs the
 * resident-instance benchmark instead and prints its results on the console.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "esp_heap_caps.h"
#include "esp_log.h"
#include "esp_timer.h"
#include "freertos/FreeRTOS.h"
#include "freertos/semphr.h"
#include "freertos/task.h"
#include "nvs_flash.h"
#include "sdkconfig.h"

#include "../../core/bench.h"
#include "device.h"

static const char *TAG = "proplet";

static proplet_t proplet;
static SemaphoreHandle_t core_lock;
static SemaphoreHandle_t work_ready;

/* ---- the port the core runs on ---- */

static bool port_publish(void *ctx, const char *topic, const char *payload, size_t len)
{
    (void)ctx;
    return mqtt_send(topic, payload, len);
}

static void port_lock(void *ctx)
{
    (void)ctx;
    xSemaphoreTake(core_lock, portMAX_DELAY);
}

static void port_unlock(void *ctx)
{
    (void)ctx;
    xSemaphoreGive(core_lock);
}

static void port_wake(void *ctx)
{
    (void)ctx;
    xSemaphoreGive(work_ready);
}

static uint64_t port_now_ms(void *ctx)
{
    (void)ctx;
    return (uint64_t)(esp_timer_get_time() / 1000);
}

static bool port_wall_clock(void *ctx, char *out, size_t len)
{
    (void)ctx;
    time_t now = time(NULL);
    /* Before SNTP has set the clock it counts from 1970: no timestamp then. */
    if (now < 1700000000)
        return false;
    struct tm utc;
    gmtime_r(&now, &utc);
    return strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &utc) > 0;
}

static uint64_t port_thread_cpu_us(void *ctx)
{
    (void)ctx;
    /* FreeRTOS run-time stats count in esp_timer microseconds (sdkconfig.defaults). */
    return (uint64_t)ulTaskGetRunTimeCounter(xTaskGetCurrentTaskHandle());
}

static void port_sample(void *ctx, proplet_sample_t *out)
{
    (void)ctx;
    const uint32_t caps = MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT;
    out->heap_total_bytes = heap_caps_get_total_size(caps);
    out->heap_free_bytes = heap_caps_get_free_size(caps);
    out->heap_min_free_bytes = heap_caps_get_minimum_free_size(caps);
    out->heap_largest_free_block = heap_caps_get_largest_free_block(caps);
}

static void port_address(void *ctx, char *out, size_t len)
{
    (void)ctx;
    wifi_address(out, len);
}

static void port_log(void *ctx, int level, const char *message)
{
    (void)ctx;
    if (level == PROPLET_LOG_ERROR)
        ESP_LOGE(TAG, "%s", message);
    else if (level == PROPLET_LOG_WARN)
        ESP_LOGW(TAG, "%s", message);
    else if (level == PROPLET_LOG_INFO)
        ESP_LOGI(TAG, "%s", message);
    else
        ESP_LOGD(TAG, "%s", message);
}

static void worker(void *unused)
{
    (void)unused;
    engine_thread_begin();
    for (;;) {
        while (proplet_run_next(&proplet)) {
        }
        xSemaphoreTake(work_ready, pdMS_TO_TICKS(1000));
    }
}

static void init_nvs(void)
{
    esp_err_t rc = nvs_flash_init();
    if (rc == ESP_ERR_NVS_NO_FREE_PAGES || rc == ESP_ERR_NVS_NEW_VERSION_FOUND) {
        /* The partition is from another layout or version: start it afresh. */
        ESP_ERROR_CHECK(nvs_flash_erase());
        rc = nvs_flash_init();
    }
    ESP_ERROR_CHECK(rc);
}

#if defined(PROPLET_BENCHMARK) && PROPLET_BENCHMARK

static uint64_t bench_cpu_us(void)
{
    return port_thread_cpu_us(NULL);
}

static uint64_t bench_heap_free(void)
{
    return heap_caps_get_free_size(MALLOC_CAP_INTERNAL | MALLOC_CAP_8BIT);
}

/* Prints one "BENCH {...}" line per kind, and again every 30 s for a monitor opened late. */
static void run_benchmark(void)
{
    char err[160];
    engine_config_t config = {PROPLET_WASM_ARENA_BYTES, 0};
    if (!engine_init(&config, err, sizeof err)) {
        ESP_LOGE(TAG, "%s", err);
        return;
    }
    char lines[2][512] = {"", ""};
    const char *kinds[2] = {"cpu", "mem"};
    for (int i = 0; i < 2; i++) {
        bench_options_t options = {BENCH_MAX_INSTANCES, 4096, 64 * 1024, bench_cpu_us, bench_heap_free};
        bench_result_t result;
        if (bench_run(kinds[i], &options, &result, err, sizeof err))
            bench_format(&result, lines[i], sizeof lines[i]);
        else
            snprintf(lines[i], sizeof lines[i], "{\"kind\":\"%s\",\"error\":\"%s\"}", kinds[i], err);
    }
    for (;;) {
        printf("BENCH %s\nBENCH %s\n", lines[0], lines[1]);
        vTaskDelay(pdMS_TO_TICKS(30000));
    }
}

#endif

void app_main(void)
{
    init_nvs();
    provisioning_start();
#if defined(PROPLET_BENCHMARK) && PROPLET_BENCHMARK
    run_benchmark();
    return;
#else
    static proplet_settings_t settings;
    settings_nvs_load(&settings);
    const char *missing = NULL;
    if (!settings_ready(&settings, true, &missing)) {
        /* The provisioning task keeps serving the console; REBOOT applies new settings. */
        ESP_LOGW(TAG, "not provisioned: %s is missing. Run `propeller firmware provision --port <port> "
                      "...` on the computer this board is plugged into.",
                 missing);
        return;
    }

    char err[160];
    engine_config_t engine = {PROPLET_WASM_ARENA_BYTES, 0};
    if (!engine_init(&engine, err, sizeof err)) {
        ESP_LOGE(TAG, "%s", err);
        return;
    }
    core_lock = xSemaphoreCreateMutex();
    work_ready = xSemaphoreCreateCounting(64, 0);
    proplet_port_t port = {NULL, port_publish, port_lock, port_unlock, port_wake, port_now_ms,
                           port_wall_clock, port_thread_cpu_us, port_sample, port_address, port_log};
    proplet_config_t cfg = {
        .slots = PROPLET_DEVICE_SLOTS,
        .max_module_bytes = PROPLET_DEVICE_MODULE_MAX,
        .stack_bytes = PROPLET_WASM_STACK_BYTES,
        .max_memory_bytes = PROPLET_WASM_MEMORY_MAX,
        .heartbeat_ms = 10000,
        .metrics_ms = 30000,
        .default_timeout_ms = 600000,
        .fetch_retry_ms = 3000,
        .fetch_retries = 5,
        .cpu_mhz = CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ,
        .description = "Propeller embedded proplet (ESP32-S3)",
        .os = "esp-idf",
        .hostname = settings.proplet_id,
        .cpu_arch = "xtensa",
        .total_memory_bytes = heap_caps_get_total_size(MALLOC_CAP_8BIT),
    };
    memcpy(cfg.proplet_id, settings.proplet_id, sizeof cfg.proplet_id);
    memcpy(cfg.domain, settings.domain, sizeof cfg.domain);
    memcpy(cfg.channel, settings.channel, sizeof cfg.channel);
    /* Provisioning checked the keys already; a device that still cannot read them runs nothing
     * rather than run unsigned modules. */
    if (!trusted_keys_parse(settings.trusted_keys, &cfg.trusted_keys, err, sizeof err)) {
        ESP_LOGE(TAG, "the provisioned trusted_keys cannot be used (%s); provision them again", err);
        return;
    }
    if (!proplet_init(&proplet, &cfg, &port, err, sizeof err)) {
        ESP_LOGE(TAG, "%s", err);
        return;
    }
    wifi_start(&settings);
    if (!mqtt_start(&settings, &proplet)) {
        ESP_LOGE(TAG, "cannot start MQTT for %s", settings.mqtt_url);
        return;
    }
    /* Workers on the application core; Wi-Fi and lwIP keep the protocol core. */
    for (int i = 0; i < PROPLET_DEVICE_SLOTS; i++)
        xTaskCreatePinnedToCore(worker, "wasm-worker", WORKER_STACK_BYTES, NULL, 4, NULL, 1);
    ESP_LOGI(TAG, "proplet %s on m/%s/c/%s/ with %d slots", settings.proplet_id, settings.domain,
             settings.channel, PROPLET_DEVICE_SLOTS);
    if (cfg.trusted_keys.count > 0)
        ESP_LOGI(TAG, "only modules signed by one of %u trusted keys run",
                 (unsigned)cfg.trusted_keys.count);
    for (;;) {
        proplet_tick(&proplet);
        vTaskDelay(pdMS_TO_TICKS(200));
    }
#endif
}
