/* Which quantized dot product is faster here: integer (x quantized per block to int8,
 * maddubs/madd; what flashrt's kernels do) or dequantize-in-register (weights converted to
 * float32 in registers, FMA with float32 x)? One thread, 4 rows at a time, both on the same
 * random blocks; median of `reps` calls.
 *
 *   gcc -O3 -fno-math-errno -I flashrt/_core bench/qdot_variants.c -o /tmp/qdot -lpthread -lm
 *   /tmp/qdot 1536 1728 400      # n k reps (SmolLM2's FFN bundle shape)
 *   /tmp/qdot 576 576 2000
 */
#include "simd.h"
#include <stdio.h>
/* dequantize-in-register variants (float x), 4 rows at a time */
FRT_TARGET static void dot4_q8_0_fdq(const uint8_t *const w[4], const float *x, int64_t nb, float *out4) {
    __m256 a[4] = {_mm256_setzero_ps(),_mm256_setzero_ps(),_mm256_setzero_ps(),_mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b*32;
        __m256 x0=_mm256_loadu_ps(xb),x1=_mm256_loadu_ps(xb+8),x2=_mm256_loadu_ps(xb+16),x3=_mm256_loadu_ps(xb+24);
        for (int r=0;r<4;r++){
            const uint8_t *blk=w[r]+b*34; const uint8_t*q=blk+2;
            __m256 s=_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q))),x0);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q+8)))),x1,s);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q+16)))),x2,s);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q+24)))),x3,s);
            a[r]=_mm256_fmadd_ps(s,_mm256_set1_ps(frt_ld_half_avx2(blk)),a[r]);
        }
    }
    _mm_storeu_ps(out4, frt_hsum8x4(a[0],a[1],a[2],a[3]));
}
FRT_TARGET static void dot4_q4_1_fdq(const uint8_t *const w[4], const float *x, const float *xsum, int64_t nb, float *out4) {
    const __m256i m15=_mm256_set1_epi32(15);
    __m256 a[4] = {_mm256_setzero_ps(),_mm256_setzero_ps(),_mm256_setzero_ps(),_mm256_setzero_ps()};
    float off[4]={0,0,0,0};
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b*32;
        __m256 x0=_mm256_loadu_ps(xb),x1=_mm256_loadu_ps(xb+8),x2=_mm256_loadu_ps(xb+16),x3=_mm256_loadu_ps(xb+24);
        for (int r=0;r<4;r++){
            const uint8_t *blk=w[r]+b*20;
            FRT_Q4_GROUPS(blk+4,e0,e1,e2,e3)
            __m256 s=_mm256_mul_ps(_mm256_cvtepi32_ps(e0),x0);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(e1),x1,s);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(e2),x2,s);
            s=_mm256_fmadd_ps(_mm256_cvtepi32_ps(e3),x3,s);
            a[r]=_mm256_fmadd_ps(s,_mm256_set1_ps(frt_ld_half_avx2(blk)),a[r]);
            off[r]+=frt_ld_half_avx2(blk+2)*xsum[b];
        }
    }
    __m128 o=frt_hsum8x4(a[0],a[1],a[2],a[3]);
    _mm_storeu_ps(out4, _mm_add_ps(o,_mm_loadu_ps(off)));
}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
    frt_set_path(1);
    int64_t n=atol(argv[1]),k=atol(argv[2]); int reps=atoi(argv[3]);
    int64_t nb=k/32;
    uint8_t *W8=malloc(n*nb*34), *W4=malloc(n*nb*20);
    for(int64_t i=0;i<n*nb*34;i++)W8[i]=rand();
    for(int64_t i=0;i<n*nb*20;i++)W4[i]=rand();
    for(int64_t b=0;b<n*nb;b++){uint16_t h=0x2e66;memcpy(W8+b*34,&h,2);memcpy(W4+b*20,&h,2);memcpy(W4+b*20+2,&h,2);}
    float *x=malloc(k*4),*out=malloc(n*4),*xs=malloc(nb*4); for(int j=0;j<k;j++)x[j]=(rand()%1000)/500.0-1; for(int b=0;b<nb;b++){xs[b]=0;for(int j=0;j<32;j++)xs[b]+=x[b*32+j];}
    int8_t*xq=malloc(k);float*xd=malloc(nb*4),*xss=malloc(nb*4);
    double t[4][2000];
    for(int r=0;r<reps;r++){
        for(int v=0;v<4;v++){
            double t0=now();
            if(v==0){frt_quantize_x(x,k,xq,xd,xss);frt_gemv_q(FRT_T_Q8_0,W8,xq,xd,xss,out,n,nb);}
            else if(v==1){for(int64_t i=0;i<n;i+=4){const uint8_t*w[4]={W8+i*nb*34,W8+(i+1)*nb*34,W8+(i+2)*nb*34,W8+(i+3)*nb*34};dot4_q8_0_fdq(w,x,nb,out+i);}}
            else if(v==2){frt_quantize_x(x,k,xq,xd,xss);frt_gemv_q(FRT_T_Q4_1,W4,xq,xd,xss,out,n,nb);}
            else {for(int64_t i=0;i<n;i+=4){const uint8_t*w[4]={W4+i*nb*20,W4+(i+1)*nb*20,W4+(i+2)*nb*20,W4+(i+3)*nb*20};dot4_q4_1_fdq(w,x,xs,nb,out+i);}}
            t[v][r]=now()-t0;
        }
    }
    const char*nm[4]={"q8_0 int8-dot","q8_0 dequant-in-reg","q4_1 int8-dot","q4_1 dequant-in-reg"};
    for(int v=0;v<4;v++){qsort(t[v],reps,sizeof(double),cmpd);double m=t[v][reps/2];printf("%lldx%lld %-22s %8.1f us  %6.2f Gweights/s\n",(long long)n,(long long)k,nm[v],m*1e6,n*k/m/1e9);}
}
